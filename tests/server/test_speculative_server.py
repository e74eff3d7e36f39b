"""The server with speculative decoding: the same completions as without, acceptance in /metrics."""

from lmgen import LLM, SamplingParams

from serverutil import serve

PROMPT = [1, *([7, 8, 9, 10, 11] * 6)]


def test_prompt_lookup_serves_the_tokens_without_and_counts_its_drafts(llama_path):
    expected = LLM(str(llama_path)).generate([PROMPT], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    with serve(llama_path, "--speculative-ngram", "4", "--served-model-name", "tiny") as server:
        reply = server.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0,
                                                   extra_body={"ignore_eos": True})
        assert reply.choices[0].text == expected[0].outputs[0].text
        metrics = server.metrics()
    record = LLM(str(llama_path), speculative_config={"method": "ngram", "num_speculative_tokens": 4}).generate(
        [PROMPT], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0].outputs[0].spec_decode
    assert 0 < record.num_accepted_tokens < record.num_draft_tokens  # some drafts fail: the counts differ
    assert [metrics[(f"lmgen_spec_decode_{name}_total", ())] for name in ("drafts", "draft_tokens",
                                                                          "accepted_tokens")] == [
        record.num_drafts, record.num_draft_tokens, record.num_accepted_tokens]  # the request's own record
