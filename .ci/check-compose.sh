#!/usr/bin/env bash
# Validate docker-compose.yml without a Docker daemon and without installing anything:
#  1. `docker-compose config -q` as the developer runs it (with ./.env if present) and with no
#     .env at all (the compose file must work without one);
#  2. every service starts through an entry point the tests/CI start the same way
#     (worker/devtools/local.py), from a Dockerfile stage that exists and has what it runs (moto's
#     S3 server: the `local` target): `edit-worker migrate|worker|beat|api|sandbox`, `python -m moto.server`,
#     `redis-server … --maxmemory-policy noeviction`, the one-shot bucket creation, or an upstream
#     image's own default (postgres; prometheus and grafana, only under the `monitoring` profile);
#  3. the app services share one environment that names every setting in worker/config.py (or
#     leaves it out on purpose), and .env.example lists every setting.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v docker-compose >/dev/null || { echo "check-compose: docker-compose not found" >&2; exit 1; }

empty_env="$(mktemp)"
resolved="$(mktemp)"
trap 'rm -f "$empty_env" "$resolved"' EXIT

echo "== docker-compose config -q"
docker-compose config -q
echo "ok"
echo "== docker-compose --env-file <empty> config -q (no .env)"
docker-compose --env-file "$empty_env" config > "$resolved"
echo "ok"

# PyYAML: from python3 if it has it, else from the interpreter docker-compose v1 itself runs on.
python=python3
if ! "$python" -c 'import yaml' 2>/dev/null; then
    python="$(head -1 "$(command -v docker-compose)" | sed -n 's/^#! *//p' | awk '{print $1}')"
    "$python" -c 'import yaml' 2>/dev/null || { echo "check-compose: no Python with PyYAML found" >&2; exit 1; }
fi

"$python" - "$resolved" <<'PY'
import json
import re
import shlex
import sys

import yaml

config = yaml.safe_load(open(sys.argv[1]))
services = config["services"]
failures = []

# The image's ENTRYPOINT, for services that only set `command`.
image_entrypoint = None
for line in open("Dockerfile"):
    if line.startswith("ENTRYPOINT"):
        image_entrypoint = json.loads(line.split(None, 1)[1])

def as_list(value):
    if value is None:
        return None
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]

EDIT_WORKER_COMMANDS = {"migrate", "worker", "beat", "api", "sandbox"}

def classify(name, svc):
    entrypoint, command = as_list(svc.get("entrypoint")), as_list(svc.get("command"))
    if entrypoint is None and "build" in svc:
        entrypoint = image_entrypoint
    if entrypoint is None and command is None:
        if str(svc.get("image", "")).startswith("postgres:"):
            return "image default: " + svc["image"], True
        # The opt-in monitoring services run their upstream image's own entry point, with the
        # configuration in deploy/ (.ci/check-deploy.sh checks it).
        if str(svc.get("image", "")).startswith(("prom/prometheus:", "grafana/grafana:")):
            ok = svc.get("profiles") == ["monitoring"]
            return "image default: " + svc["image"] + ("" if ok else "   <- only under the `monitoring` profile"), ok
        return "image default: %s (unknown)" % svc.get("image"), False
    argv = (entrypoint or []) + (command or [])
    text = " ".join(shlex.quote(a) for a in argv)
    if argv[:1] == ["edit-worker"] and len(argv) > 1 and argv[1] in EDIT_WORKER_COMMANDS:
        return text, True
    if argv[:3] == ["python", "-m", "moto.server"]:
        # moto is in the `local` extra, which only the Dockerfile's `local` target installs.
        target = (svc.get("build") or {}).get("target") if isinstance(svc.get("build"), dict) else None
        ok = "build" not in svc or target == "local"
        return text + ("" if ok else "   <- needs build.target: local (moto is not in the production image)"), ok
    if argv[:1] == ["redis-server"]:
        ok = any(argv[i:i + 2] == ["--maxmemory-policy", "noeviction"] for i in range(len(argv)))
        return text + ("" if ok else "   <- needs --maxmemory-policy noeviction"), ok
    if argv[:2] == ["python", "-c"] and len(argv) == 3 and "ensure_bucket()" in argv[2]:
        return "python -c '…Storage.from_settings(get_settings()).ensure_bucket()' (one-shot bucket creation)", True
    return text, False

# Every build target named in the compose file is a stage of the Dockerfile.
stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", open("Dockerfile").read(), re.M | re.I))
for name, svc in services.items():
    build = svc.get("build")
    target = build.get("target") if isinstance(build, dict) else None
    if target and target not in stages:
        failures.append("%s: build target %r is not a stage of the Dockerfile (%s)" % (name, target, ", ".join(sorted(stages))))

print("== entry points")
for name in sorted(services):
    text, ok = classify(name, services[name])
    print("  %-14s %s %s" % (name, "ok  " if ok else "FAIL", text))
    if not ok:
        failures.append("%s: entry point not one the tests/CI start: %s" % (name, text))

print("== environment")
config_src = open("worker/config.py").read()
settings = set(re.findall(r'_env\("([A-Z0-9_]+)"\)', config_src))
# Named in the brief before it reaches Settings; read from the environment by worker/webhooks.py.
settings.add("WAVESPEED_WEBHOOK_SECRET")
# Deliberately not in the shared compose environment (see the comments in docker-compose.yml).
left_out = {"EDIT_WORKER_REDIS_URL", "EDIT_WORKER_ALLOW_PRIVATE_URLS"}
app = [n for n, s in services.items() if "build" in s and n not in ("s3", "sandbox")]
envs = {n: services[n].get("environment") or {} for n in app}
reference = sorted(envs[app[0]])
for name in app:
    if sorted(envs[name]) != reference:
        failures.append("%s: environment differs from %s" % (name, app[0]))
missing = sorted(settings - set(reference) - left_out)
print("  app services sharing one environment: %s" % ", ".join(sorted(app)))
print("  settings in worker/config.py: %d; in the compose environment: %d; left out on purpose: %s"
      % (len(settings), len(settings & set(reference)), ", ".join(sorted(left_out))))
if missing:
    failures.append("settings missing from the compose environment: " + ", ".join(missing))
example = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", open(".env.example").read(), re.M))
missing = sorted(settings - example)
print("  .env.example names %d settings" % len(settings & example))
if missing:
    failures.append(".env.example lacks: " + ", ".join(missing))
key = envs[app[0]].get("WAVESPEED_API_KEY")
print("  WAVESPEED_API_KEY without .env: %r" % key)
if key not in (None, "sandbox-key"):
    failures.append("WAVESPEED_API_KEY resolves to a hard-coded value: %r" % key)

print("== ordering and shutdown")
def condition(svc, dep):
    return ((services[svc].get("depends_on") or {}).get(dep) or {}).get("condition")
for svc, dep, want in [("worker", "migrate", "service_completed_successfully"),
                       ("beat", "migrate", "service_completed_successfully"),
                       ("api", "migrate", "service_completed_successfully"),
                       ("worker", "redis", "service_healthy"),
                       ("migrate", "postgres", "service_healthy")]:
    got = condition(svc, dep)
    print("  %-8s after %-9s %s" % (svc, dep, got))
    if got != want:
        failures.append("%s should depend on %s with %s, has %s" % (svc, dep, want, got))
grace = services["worker"].get("stop_grace_period")
beat_scale = services["beat"].get("scale", 1)
print("  worker stop_grace_period: %s; beat scale: %s" % (grace, beat_scale))
if not grace:
    failures.append("worker has no stop_grace_period (acks_late warm shutdown)")
if beat_scale != 1:
    failures.append("beat must run exactly one replica")

if failures:
    print("\nFAILED:")
    for failure in failures:
        print("  - " + failure)
    sys.exit(1)
print("\ncompose checks passed")
PY
