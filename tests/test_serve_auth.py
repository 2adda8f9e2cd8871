"""Auth (API keys, JWT), rate limits and the Redis-backed limiter and cache, against real servers.

The Redis tests start a real redis-server on a free port (skipped, with the
reason, only when the binary is not installed: `apt-get install redis-server`).
"""

import shutil
import socket
import subprocess
import time

import httpx
import jwt
import openai
import pytest

from retro_peft.errors import InputError
from retro_peft.serving.app import create_app
from retro_peft.serving.auth import hash_key, parse_key_list
from retro_peft.serving.settings import ServeSettings
from retro_peft.serving.testing import serve_in_thread

from test_serve import QUESTIONS, build_bank

SECRET = "a-test-secret-of-at-least-32-bytes!!"
GEN_KEY, RETRIEVE_KEY = "sk-gen-only", "sk-retrieve-only"


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    return build_bank(tmp_path_factory.mktemp("serve-auth"))


def auth_settings(**extra) -> ServeSettings:
    keys = [{"name": "gen", "key_sha256": hash_key(GEN_KEY), "scopes": ["generate"]},
            {"name": "ret", "key": RETRIEVE_KEY, "scopes": ["retrieve"]}]
    return ServeSettings(auth={"keys": keys, "jwt": {"secret": SECRET, "audience": "retro-peft"}},
                         generation={"default_max_tokens": 4}, **extra)


@pytest.fixture(scope="module")
def url(bank):
    with serve_in_thread(create_app(auth_settings(limits={"requests_per_minute": 5}), bank)) as base_url:
        yield base_url


def token(exp_in: float = 300, nbf_in: float = 0, aud: str = "retro-peft", scope: str = "generate", sub: str = "u1",
          secret: str = SECRET) -> str:
    now = time.time()
    return jwt.encode({"sub": sub, "aud": aud, "scope": scope, "exp": int(now + exp_in), "nbf": int(now + nbf_in)},
                      secret, algorithm="HS256")


def post(url, path, credential=None, **body):
    headers = {"Authorization": f"Bearer {credential}"} if credential else {}
    body = body or {"model": "a", "prompt": QUESTIONS[0], "max_tokens": 2}
    return httpx.post(f"{url}{path}", json=body, headers=headers)


def test_keys_scopes_and_jwt(url):
    missing = post(url, "/v1/completions")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    assert missing.headers["www-authenticate"] == "Bearer"
    assert post(url, "/v1/completions", "sk-wrong").status_code == 401
    assert post(url, "/v1/completions", GEN_KEY).status_code == 200  # stored as a digest only
    wrong_scope = post(url, "/v1/completions", RETRIEVE_KEY)
    assert wrong_scope.status_code == 403 and wrong_scope.json()["error"]["type"] == "permission_error"
    assert post(url, "/v1/retrieve", RETRIEVE_KEY, model="a", query="piano").status_code == 200
    assert post(url, "/v1/retrieve", GEN_KEY, model="a", query="piano").status_code == 403

    assert post(url, "/v1/completions", token(sub="jwt-ok")).status_code == 200
    expired = post(url, "/v1/completions", token(exp_in=-60, sub="jwt-expired"))
    assert expired.status_code == 401 and expired.json()["error"]["code"] == "token_expired"
    assert post(url, "/v1/completions", token(nbf_in=600)).status_code == 401
    assert post(url, "/v1/completions", token(aud="someone-else")).status_code == 401
    assert post(url, "/v1/completions", token(secret="another-secret-of-at-least-32-bytes")).status_code == 401
    assert post(url, "/v1/completions", token(scope="retrieve", sub="jwt-r")).status_code == 403

    # Health is open; metrics and models need credentials.
    assert httpx.get(f"{url}/health/ready").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 401
    assert httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {GEN_KEY}"}).status_code == 403
    assert httpx.get(f"{url}/v1/models").status_code == 401


def test_cache_hits_pass_the_same_checks_as_any_request(url):
    # A repeat of a cached request is answered before FastAPI's routing (RequestContext._cache_hit):
    # it must still be refused for every reason the full path refuses it.
    body = {"model": "b", "prompt": QUESTIONS[2], "max_tokens": 2, "temperature": 0}
    first = post(url, "/v1/completions", token(sub="cache-1"), **body)
    hit = post(url, "/v1/completions", token(sub="cache-2"), **body)
    assert (first.status_code, first.headers["x-cache"], hit.status_code, hit.headers["x-cache"]) == \
        (200, "miss", 200, "hit")
    assert {k: v for k, v in hit.json().items() if k not in ("id", "created")} == \
        {k: v for k, v in first.json().items() if k not in ("id", "created")}
    assert hit.json()["id"] != first.json()["id"] and hit.headers["x-request-id"]
    assert hit.headers["x-ratelimit-limit-requests"] == "5" and hit.headers["content-type"] == "application/json"
    refusals = {None: (401, "missing_api_key"), "sk-wrong": (401, "invalid_api_key"),
                RETRIEVE_KEY: (403, "insufficient_scope"), token(exp_in=-60, sub="cache-3"): (401, "token_expired"),
                token(scope="retrieve", sub="cache-4"): (403, "insufficient_scope")}
    for credential, (status, code) in refusals.items():
        refused = post(url, "/v1/completions", credential, **body)
        assert (refused.status_code, refused.json()["error"]["code"]) == (status, code), credential
        assert "x-cache" not in refused.headers
    limited = token(sub="cache-limited")
    statuses = [post(url, "/v1/completions", limited, **body).status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]  # cache hits count against the request limit


def test_requests_per_minute_gives_429_with_headers(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=token(sub="limited"), max_retries=0)
    for _ in range(5):
        ok = client.completions.with_raw_response.create(model="a", prompt=QUESTIONS[1], max_tokens=2)
    assert ok.headers["x-ratelimit-limit-requests"] == "5" and ok.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError) as refused:
        client.completions.create(model="a", prompt=QUESTIONS[1], max_tokens=2)
    assert int(refused.value.response.headers["retry-after"]) >= 1
    assert refused.value.response.json()["error"]["type"] == "rate_limit_error"
    # Other keys have their own budget.
    assert post(url, "/v1/completions", token(sub="someone-else")).status_code == 200


def test_tokens_per_minute(bank):
    app = create_app(auth_settings(limits={"tokens_per_minute": 40}), bank)
    with serve_in_thread(app) as url:
        # ~6 prompt tokens + 10; sampled, so not served from the cache (hits cost no tokens)
        body = {"model": "a", "prompt": QUESTIONS[0], "max_tokens": 10, "temperature": 0.5}
        statuses = [post(url, "/v1/completions", GEN_KEY, **body).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        too_big = post(url, "/v1/completions", GEN_KEY, **{**body, "max_tokens": 100})
        assert too_big.status_code == 429 and "lower max_tokens" in too_big.json()["error"]["message"]


def test_keys_from_the_environment_and_no_auth_must_be_explicit(monkeypatch):
    keys = parse_key_list(f"sk-one, sha256={hash_key('sk-two')}:retrieve+admin,")
    assert [k.name for k in keys] == ["env-0", "env-1"] and keys[1].scopes == ["retrieve", "admin"]
    with pytest.raises(InputError, match="no API keys and no JWT secret"):
        create_app(ServeSettings())
    monkeypatch.setenv("RETRO_PEFT_API_KEYS", "sk-env:generate")
    from retro_peft.serving.settings import load_settings

    assert load_settings().api_keys.get_secret_value() == "sk-env:generate"
    create_app(load_settings())  # keys from the environment are enough


def test_jwt_settings_that_cannot_verify_any_token_fail_at_start_up(tmp_path):
    pem = tmp_path / "public.pem"
    pem.write_text("-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n")
    cases = [({"public_key_file": str(pem)}, r"algorithm 'HS256' cannot use auth\.jwt\.public_key_file .*asymmetric"),
             # a malformed PEM, or no `cryptography` package to read one
             ({"public_key_file": str(pem), "algorithms": ["RS256"]}, r"algorithm 'RS256'"),
             ({"secret": SECRET, "algorithms": ["HS999"]}, r"algorithm 'HS999'"),
             ({"secret": ""}, r"auth\.jwt\.secret: HMAC key must not be empty"),
             ({"secret": SECRET, "algorithms": []}, r"auth\.jwt\.algorithms is empty")]
    for jwt_settings, message in cases:
        with pytest.raises(InputError, match=message):
            create_app(ServeSettings(auth={"jwt": jwt_settings}))


def test_a_key_error_while_verifying_a_token_is_401_not_500(url, monkeypatch):
    # Start-up checks the key against every configured algorithm; should PyJWT still reject it while
    # verifying (InvalidKeyError is a PyJWTError but not an InvalidTokenError), the token is refused, not a 500.
    credential = token(sub="key-error")

    def reject(self, key):
        raise jwt.InvalidKeyError("the key does not fit")

    monkeypatch.setattr(jwt.algorithms.HMACAlgorithm, "prepare_key", reject)
    refused = post(url, "/v1/completions", credential)
    assert (refused.status_code, refused.json()["error"]["code"]) == (401, "invalid_token"), refused.text


# -- Redis ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian package: redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def test_two_replicas_share_limits_and_cache_through_redis(bank, redis_url):
    def replica():
        return create_app(auth_settings(limits={"requests_per_minute": 4, "storage_uri": redis_url},
                                        cache={"redis_url": redis_url}), bank)

    with serve_in_thread(replica()) as one, serve_in_thread(replica()) as two:
        body = {"model": "plain", "prompt": "What does a cat do when content?", "max_tokens": 4, "temperature": 0}
        first = post(one, "/v1/completions", GEN_KEY, **body)
        second = post(two, "/v1/completions", GEN_KEY, **body)  # the other replica: a hit from Redis
        assert first.headers["x-cache"] == "miss" and second.headers["x-cache"] == "hit"
        assert first.json()["choices"] == second.json()["choices"]
        assert second.headers["x-ratelimit-remaining-requests"] == "2"  # counted across replicas
        assert post(one, "/v1/completions", GEN_KEY, **body).status_code == 200
        assert post(two, "/v1/completions", GEN_KEY, **body).status_code == 200
        refused = post(one, "/v1/completions", GEN_KEY, **body)
        assert refused.status_code == 429 and "retry-after" in refused.headers

        search = {"model": "b", "query": "who discovered oxygen", "k": 2}
        assert post(one, "/v1/retrieve", RETRIEVE_KEY, **search).headers.get("x-cache") is None
        assert post(two, "/v1/retrieve", RETRIEVE_KEY, **search).headers["x-cache"] == "hit"


def test_a_changed_domain_never_gets_another_versions_answers_from_a_shared_cache(bank, redis_url):
    """Cache keys carry the domain's version (index content, adapter weights, KV cache on or off): a replica or
    a restart that serves another adapter or index under the same domain name misses; the same content hits."""
    from retro_peft.domains.bank import AdapterBank

    a, b, _plain = bank.domains["a"], bank.domains["b"], bank.domains["plain"]
    restarted = AdapterBank(bank.base_model_name, max_new_tokens=8)
    restarted.load("a", a.index.path, b.adapter_dir)  # domain "a" retrained: another adapter, same name
    restarted.load("plain", a.index.path)  # domain "plain" re-indexed: another index, same name
    restarted.load("b", b.index.path, b.adapter_dir)  # domain "b" unchanged
    assert restarted.domains["b"].version == b.version and restarted.version("auto") != bank.version("auto")
    settings = auth_settings(cache={"redis_url": redis_url})
    ask = {"prompt": "Which shrub do tea leaves come from, and why?", "max_tokens": 4, "temperature": 0}
    search = {"query": "where does the rhine flow", "k": 2}
    with serve_in_thread(create_app(settings, bank)) as old:
        for model in ("a", "b", "plain", "auto"):
            assert post(old, "/v1/completions", GEN_KEY, model=model, **ask).headers["x-cache"] == "miss"
        for model in ("plain", "b"):
            assert post(old, "/v1/retrieve", RETRIEVE_KEY, model=model, **search).headers.get("x-cache") is None
    with serve_in_thread(create_app(settings, restarted)) as new:
        hits = {m: post(new, "/v1/completions", GEN_KEY, model=m, **ask).headers["x-cache"]
                for m in ("a", "b", "plain", "auto")}
        assert hits == {"a": "miss", "b": "hit", "plain": "miss", "auto": "miss"}
        assert post(new, "/v1/retrieve", RETRIEVE_KEY, model="plain", **search).headers.get("x-cache") is None
        assert post(new, "/v1/retrieve", RETRIEVE_KEY, model="b", **search).headers["x-cache"] == "hit"
