"""The web chat page in headless Chromium (Debian's package, driven by Playwright)."""

import json
import shutil

import pytest

from serverutil import demo_model_path, serve  # noqa: F401 (fixture)

sync_api = pytest.importorskip("playwright.sync_api", reason="the web page test needs playwright (pip install)")

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_path() -> str:
    """Debian's chromium (.ci/run installs it); the test skips where it is missing."""
    found = shutil.which("chromium")
    if found is None:
        pytest.skip("the web page test needs Chromium on PATH (apt-get install chromium; .ci/run installs it)")
    return found


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(demo_model_path):
    with serve(demo_model_path, "--served-model-name", "demo") as process:
        yield process


@pytest.fixture
def page(browser, server):
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('context')")
    yield page
    context.close()


def long_replies(page, max_tokens: int, sent: list) -> None:
    """Make every chat request run long (EOS ignored), recording the bodies the page sends."""

    def handle(route):
        body = json.loads(route.request.post_data)
        sent.append(body)
        route.continue_(post_data=json.dumps({**body, "max_tokens": max_tokens, "ignore_eos": True}))

    page.route("**/v1/chat/completions", handle)


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def test_a_reply_streams_in_and_stop_aborts_it(page, server):
    context = int(page.text_content("#model").split("context ")[1].split()[0])
    sent = []
    long_replies(page, context // 2, sent)
    aborted = server.metric("lmgen_requests_total", status="abort")
    send(page, "Tell me a long story.")
    # Mid-stream: text has arrived and the stop button is live.
    page.wait_for_function("""() => {
        const reply = document.querySelector('.message.assistant .content');
        return reply && reply.textContent.length > 0 && !document.getElementById('stop').disabled;
    }""")
    assert page.is_disabled("#send")
    page.click("#stop")
    page.wait_for_selector(".message.assistant[data-done=true]")
    assert "stopped" in page.text_content(".message.assistant .note")
    assert page.text_content(".message.assistant .content")
    assert "tok/s" in page.text_content("#stats")
    assert page.is_enabled("#send") and page.is_disabled("#stop")
    assert server.wait_for_metric("lmgen_requests_total", lambda v: v > aborted, status="abort") == aborted + 1
    assert sent[0]["stream"] is True and sent[0]["messages"] == [{"role": "user", "content": "Tell me a long story."}]


def test_settings_and_the_conversation_go_into_each_request(page):
    sent = []
    long_replies(page, 4, sent)
    page.fill("#system", "Be brief.")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "4")
    send(page, "one")
    page.wait_for_selector(".message.assistant[data-done=true]")
    first_reply = page.text_content(".message.assistant .content")
    send(page, "two")
    page.locator(".message.assistant[data-done=true]").nth(1).wait_for()
    assert len(sent) == 2
    assert sent[1]["temperature"] == 0 and sent[1]["max_tokens"] == 4 and sent[1]["model"] == "demo"
    roles = [m["role"] for m in sent[1]["messages"]]
    assert roles == ["system", "user", "assistant", "user"]
    assert sent[1]["messages"][0]["content"] == "Be brief."
    assert sent[1]["messages"][2]["content"].strip() == first_reply.strip()
    assert "4 tokens" in page.text_content("#stats")
    page.click("#new-chat")
    assert page.locator(".message").count() == 0


def scripted_reply(page, prompt: str, deltas: list[dict]):
    """Send `prompt` while the server is stubbed to stream `deltas` (a chunk each, the last one finishing);
    the assistant's message once it is done."""
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
              *[{"choices": [{"index": 0, "delta": delta}]} for delta in deltas[:-1]],
              {"choices": [{"index": 0, "delta": deltas[-1], "finish_reason": "stop"}]}]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions",
               lambda route: route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body))
    send(page, prompt)
    page.wait_for_selector(".message.assistant[data-done=true]")
    return page.locator(".message.assistant")


def test_model_output_is_rendered_as_markdown_never_as_html(page):
    hostile = ('<img src=x onerror="window.pwned=1"> **bold** and `<b>code</b>`\n\n- one\n- two\n\n'
               '```\n<script>window.pwned=2</script>\n```')
    reply = scripted_reply(page, "say something dangerous", [{"content": hostile[:20]}, {"content": hostile[20:]}])
    reply = reply.locator(".content")
    assert reply.locator("img, script, b").count() == 0
    assert reply.locator("strong").text_content() == "bold"
    assert reply.locator("code").first.text_content() == "<b>code</b>"
    assert reply.locator("li").count() == 2
    assert "<script>" in reply.locator("pre").text_content()
    assert page.evaluate("window.pwned") is None


def test_a_reasoning_models_thinking_is_shown_as_text_before_its_answer(page):
    bubble = scripted_reply(page, "is 2 even?", [{"reasoning_content": "Is <b>2</b> "},
                                                 {"reasoning_content": "even? Yes."}, {"content": "**Yes**"}])
    assert bubble.locator(":scope > div").evaluate_all("parts => parts.map(p => p.className)") == [
        "reasoning", "content"]
    assert bubble.locator(".reasoning").text_content() == "Is <b>2</b> even? Yes."
    assert bubble.locator(".content strong").text_content() == "Yes"
