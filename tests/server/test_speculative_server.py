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
    assert metrics[("lmgen_spec_decode_draft_tokens_total", ())] > 0
    assert 0 < metrics[("lmgen_spec_decode_accepted_tokens_total", ())] <= metrics[
        ("lmgen_spec_decode_draft_tokens_total", ())]
