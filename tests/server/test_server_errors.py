"""Every error rule of the API: status code and OpenAI's error shape; never a 500 for bad input.

The server runs with an API key (from LMGEN_API_KEY), a batch of 2 and a queue of 1,
so that the 401 and 429 rules can be shown; its last test is the SIGTERM shutdown.
"""

import contextlib
import signal
import threading
import time

import httpx
import openai
import pytest

from serverutil import serve

KEY = "test-key"
# Long enough (on the 256-token context) to still be running when the test acts on it.
LONG = {"max_tokens": 200, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(llama_path):
    with serve(llama_path, "--served-model-name", "tiny", "--max-num-seqs", "2",
               "--max-queued-requests", "1", "--shutdown-timeout", "3", env={"LMGEN_API_KEY": KEY},
               api_key=KEY) as process:
        yield process


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code
    return error


def test_api_key_is_required(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.post(server.url + "/v1/completions", json={"prompt": "hi"}, headers=headers)
        assert_error(response, 401, code="invalid_api_key")
    with pytest.raises(openai.AuthenticationError) as caught:
        server.client(api_key="wrong").models.list()
    assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
    assert server.client().models.list().data[0].id == "tiny"
    for open_path in ("/health", "/metrics", "/"):  # monitoring and the page itself need no key
        assert httpx.get(server.url + open_path).status_code == 200


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as caught:
        server.client().completions.create(model="gpt-17", prompt="hi", max_tokens=2)
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"
    assert "tiny" in caught.value.body["message"]
    assert_error(server.post("/v1/chat/completions", json={"model": "x", "messages": [{"role": "user",
                                                                                         "content": "hi"}]}),
                 404, "model", "model_not_found")
    assert_error(server.post("/v1/nothing-here", json={}), 404)


COMPLETION_ERRORS = [
    ({"temperature": -1}, "temperature"),
    ({"structured_outputs": {"json": {"type": "array", "uniqueItems": True}}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "start: b"}}, "structured_outputs"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -5}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"n": 0}, "n"),
    ({"logprobs": 50}, "logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
    ({"stop": [""]}, "stop"),
    ({"seed": 1.5}, "seed"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [999999]}, "prompt"),
    ({"prompt": {"text": "hi"}}, "prompt"),
    ({"temprature": 0.5}, "temprature"),  # a typo is named, not ignored
    ({"suffix": "end"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"max_tokens": 0, "logprobs": 1}, "max_tokens"),  # 0 only with echo or prompt_logprobs
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),  # more than --max-logprobs
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ({"echo": True, "logprobs": 21}, "logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"length_penalty": 2.0}, "length_penalty"),  # without use_beam_search
]


@pytest.mark.parametrize("fields, param", COMPLETION_ERRORS, ids=[p for _, p in COMPLETION_ERRORS])
def test_bad_completion_fields_are_400_naming_the_field(server, fields, param):
    response = server.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2, **fields})
    assert_error(response, 400, param)["type"] == "invalid_request_error"


USER = [{"role": "user", "content": "hi"}]
CHAT_ERRORS = [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]},
     "messages.0.tool_calls.0.function"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}, "structured_outputs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"prompt_logprobs": 1.5}, "prompt_logprobs"),
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ({"temperature": -0.5}, "temperature"),
    ({"chat_template": "{{ raise_exception('no such conversation') }}"}, "messages"),
    ({"chat_template_kwargs": {"add_generation_prompt": 3, "messages": []}}, "messages"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"length_penalty": 2.0}, "length_penalty"),  # without use_beam_search
]


@pytest.mark.parametrize("fields, param", CHAT_ERRORS, ids=[p for _, p in CHAT_ERRORS])
def test_bad_chat_fields_are_400_naming_the_field(server, fields, param):
    response = server.post("/v1/chat/completions", json={"model": "tiny", "messages": USER, "max_tokens": 2,
                                                         **fields})
    assert_error(response, 400, param)


def test_malformed_bodies_are_400(server):
    for content in (b"{not json", b"null", b"[]", b'"text"'):
        response = server.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
        assert_error(response, 400)
    assert_error(server.post("/v1/completions", json={"max_tokens": 2}), 400, "prompt")


def test_the_openai_client_sees_bad_request(server):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().completions.create(model="tiny", prompt="hi", temperature=-1)
    assert caught.value.status_code == 400 and caught.value.body["param"] == "temperature"
    assert "temperature" in caught.value.body["message"]


def test_prompt_plus_max_tokens_over_the_context_names_both_numbers(server):
    tokens = server.post("/tokenize", json={"prompt": "Portugal is"}).json()["count"]
    error = assert_error(server.post("/v1/completions", json={"prompt": "Portugal is", "max_tokens": 256}),
                         400, "max_tokens", "context_length_exceeded")
    assert f"({tokens} tokens)" in error["message"] and "(256)" in error["message"]
    assert "256 tokens" in error["message"]  # the context
    error = assert_error(server.post("/v1/completions", json={"prompt": [5] * 300, "max_tokens": 1}),
                         400, "prompt", "context_length_exceeded")
    assert "300" in error["message"] and "256" in error["message"]
    error = assert_error(server.post("/v1/chat/completions", json={"messages": USER, "max_completion_tokens": 300}),
                         400, "max_completion_tokens", "context_length_exceeded")
    assert "300" in error["message"] and "256" in error["message"]


def test_a_full_queue_is_429_with_retry_after(server):
    body = {"model": "tiny", "prompt": "hi", "stream": True, **LONG}
    with httpx.Client(headers=server.headers(), timeout=60) as client, contextlib.ExitStack() as streams:
        for _ in range(3):  # 2 running + 1 queued fill the server
            response = streams.enter_context(client.stream("POST", server.url + "/v1/completions", json=body))
            assert response.status_code == 200
        refused = client.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        error = assert_error(refused, 429, code="queue_full")
        assert refused.headers["Retry-After"] == "1" and error["type"] == "rate_limit_error"
    assert server.wait_for_metric("lmgen_requests_rejected_total", lambda v: v >= 1) >= 1
    deadline = time.monotonic() + 30  # the dropped streams are aborted: the server takes requests again
    while (response := server.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})).status_code == 429:
        assert time.monotonic() < deadline, "the aborted streams still count as in flight"
        time.sleep(0.2)
    assert response.status_code == 200


def test_a_bad_prompt_among_several_leaves_none_running(server):
    """A request's prompts are queued together, all or nothing: the good ones are aborted."""
    aborted = server.metric("lmgen_requests_total", status="abort")
    body = {"model": "tiny", "prompt": [[5, 6], [999999], [7, 8]], **LONG}
    assert_error(server.post("/v1/completions", json=body), 400, "prompt")
    assert server.wait_for_metric("lmgen_requests_total", lambda v: v >= aborted + 2, status="abort") == aborted + 2


def test_no_500_for_odd_requests(server):
    odd = [
        ("/v1/completions", {"prompt": ["a", [1, 2]]}),
        ("/v1/completions", {"prompt": "hi", "stop_token_ids": ["x"]}),
        ("/v1/completions", {"prompt": "hi", "n": 1000}),
        ("/v1/chat/completions", {"messages": [{"role": "user"}], "continue_final_message": True}),
        ("/v1/chat/completions", {"messages": USER, "chat_template_kwargs": {"tools": 5}}),
        ("/v1/chat/completions", {"messages": [{"content": "hi"}]}),
        ("/tokenize", {}),
        ("/tokenize", {"prompt": "a", "messages": USER}),
        ("/detokenize", {"tokens": [-1]}),
    ]
    for path, body in odd:
        response = server.post(path, json={"max_tokens": 2, **body} if path.startswith("/v1") else body)
        assert response.status_code < 500, (path, body, response.text)
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_sigterm_finishes_or_aborts_in_flight_requests_and_exits_0(server):
    """Runs last: SIGTERM stops accepting, gives in-flight requests the grace period, exits 0."""
    received = []

    def long_stream():
        body = {"model": "tiny", "prompt": "hi", "stream": True, **LONG}
        with contextlib.suppress(httpx.HTTPError):
            with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=server.headers(),
                              timeout=60) as response:
                for line in response.iter_lines():
                    received.append(line)

    thread = threading.Thread(target=long_stream)
    thread.start()
    while not received:
        time.sleep(0.05)
    assert server.stop(signal.SIGTERM) == 0
    thread.join(30)
    assert not thread.is_alive()
    assert received[-2:] == ["data: [DONE]", ""]  # the stream ended properly, not cut off
    assert any('"finish_reason":"abort"' in line or '"finish_reason":"length"' in line for line in received)
    assert "Traceback" not in server.log()
