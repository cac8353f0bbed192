"""Specification of prediction ids in URL paths: an id from the provider, a webhook, the Redis
journal or an operator goes into `/api/v3/predictions/{id}` only if it is of the provider's form."""

from __future__ import annotations

import httpx
import pytest

from worker.adapters.wavespeed import InvalidPredictionId, WaveSpeedClient, valid_prediction_id
from worker.errors import PermanentProviderError


@pytest.mark.parametrize("prediction_id", ["pred-0001", "6a0ee3c1d7e44b1a9c1f6e3c8f3b4a5d", "A_b-9", "x" * 128])
def test_provider_shaped_ids_are_valid(prediction_id):
    assert valid_prediction_id(prediction_id)


@pytest.mark.parametrize(
    "prediction_id",
    ["", "../balance", "a/b", "a?x=1", "a#b", "a b", "a%2Fb", "-leading-dash", "x" * 129, "é", "a\x00", "a\n", 12, None],
)
def test_anything_else_is_not(prediction_id):
    assert not valid_prediction_id(prediction_id)


@pytest.mark.parametrize("call", ["result", "cancel"])
@pytest.mark.parametrize("prediction_id", ["../../api/v3/balance", "x/../../y", "abc?status=completed", "a#b", "a\u2603"])
def test_the_client_refuses_to_put_a_bad_id_in_a_url_path_and_sends_nothing(call, prediction_id):
    sent: list[httpx.Request] = []
    client = WaveSpeedClient(
        "key", "https://api.wavespeed.test", transport=httpx.MockTransport(lambda r: sent.append(r) or httpx.Response(200))
    )

    with pytest.raises(InvalidPredictionId) as refused:
        getattr(client, call)(prediction_id)

    assert isinstance(refused.value, PermanentProviderError)
    assert sent == []
    client.close()
