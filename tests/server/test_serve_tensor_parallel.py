"""`lmgen serve --tensor-parallel-size 2`: the server's engine on two ranks (gloo) answers the OpenAI client."""

from serverutil import serve


def test_serve_with_two_ranks_answers_the_openai_client(llama_path):
    with serve(llama_path, "--served-model-name", "tiny", "--tensor-parallel-size", "2", "--device", "cpu",
               "--dtype", "float32", "--log-level", "INFO") as server:
        client = server.client()
        completion = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=8,
                                               temperature=0)
        assert completion.usage.completion_tokens == 8
        chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=6, temperature=0, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "tensor parallelism: 2 ranks (gloo)" in server.log()
