"""The real backends on the small model (SmolLM2-135M-Instruct): in-process vLLM (the session's
shared engine), HFBackend (transformers, micro-batched) and OpenAIBackend against a real vLLM
server subprocess. A few minutes on a CPU."""

from __future__ import annotations

import asyncio

import pytest

from aft_graph.backends import GenerationRequest, PromptTooLongError, Sampling

pytestmark = pytest.mark.slow

QUESTION = "List five fruits, one per line."


def chat(content: str = QUESTION, **sampling) -> GenerationRequest:
    return GenerationRequest(
        messages=({"role": "user", "content": content},), sampling=Sampling(**sampling)
    )


def _stop_inside(text: str) -> tuple[str, str]:
    """A stop string taken from the middle of ``text`` and the text a stop there leaves."""
    middle = len(text) // 2
    stop = text[middle : middle + 3]
    assert stop.strip(), f"pick another prompt: {text!r}"
    return stop, text[: text.find(stop)]


async def _check_stop_strings(backend) -> None:
    """A greedy run, then the same run with a stop string from its middle: cut there, and fewer
    tokens generated."""
    full = (await backend.generate(chat(temperature=0.0, max_tokens=40)))[0]
    stop, expected = _stop_inside(full.text)
    cut = (await backend.generate(chat(temperature=0.0, max_tokens=40, stop=(stop,))))[0]
    assert cut.text == expected
    assert cut.finish_reason == "stop"
    assert 0 < cut.completion_tokens < full.completion_tokens


async def _check_n_and_accounting(backend) -> None:
    request = chat(n=4, temperature=1.0, max_tokens=12, seed=1)
    out = await backend.generate(request)
    assert len(out) == 4
    assert len({c.text for c in out}) > 1  # four samples, not one copied
    for c in out:
        assert c.prompt_tokens == backend.count_prompt_tokens(request)
        assert 0 < c.completion_tokens <= 12
        assert c.finish_reason in ("stop", "length")
        if c.finish_reason == "length":
            assert c.completion_tokens == 12


async def _check_seeds(backend) -> None:
    request = chat(n=2, temperature=1.0, max_tokens=12, seed=123)
    first = [c.text for c in await backend.generate(request)]
    again = [c.text for c in await backend.generate(request)]
    other = [c.text for c in await backend.generate(chat(n=2, temperature=1.0, max_tokens=12, seed=124))]
    assert first == again
    assert first != other


# ------------------------------------------------------------------ VLLMBackend (in-process)


@pytest.mark.vllm
class TestVLLMBackend:
    async def test_n_completions_and_token_accounting(self, vllm_backend):
        await _check_n_and_accounting(vllm_backend)

    async def test_seed_reproducibility(self, vllm_backend):
        await _check_seeds(vllm_backend)

    async def test_stop_strings(self, vllm_backend):
        await _check_stop_strings(vllm_backend)

    async def test_exact_count_when_the_model_ends_its_turn(self, vllm_backend):
        out = (await vllm_backend.generate(chat("Say hi.", temperature=0.0, max_tokens=200)))[0]
        assert out.finish_reason == "stop"
        # The text plus the end-of-turn token (counted, not shown).
        assert out.completion_tokens == vllm_backend.count_tokens(out.text) + 1

    async def test_too_long_prompt(self, vllm_backend):
        with pytest.raises(PromptTooLongError, match="context window is 2048"):
            await vllm_backend.generate(chat("apple " * 2100))


# ------------------------------------------------------------------ HFBackend


@pytest.fixture(scope="module")
async def hf_backend(small_model_dir):
    import torch

    from aft_graph.backends import HFBackend

    # On a CPU shared with other busy processes (a vLLM engine in this very session), torch's
    # OpenMP threads wait on each other: 20 greedy tokens took 20 s with 2 threads and 3.6 s
    # with 1 on this 2-core machine. One thread keeps this module to seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    backend = HFBackend(small_model_dir, max_batch_size=16)
    yield backend
    await backend.aclose()
    torch.set_num_threads(threads)


@pytest.fixture
def batch_spy(hf_backend, monkeypatch):
    """Records the number of requests in every ``model.generate`` batch."""
    sizes: list[int] = []
    original = hf_backend._generate_batch

    def spy(batch, stopping):
        sizes.append(len(batch))
        return original(batch, stopping)

    monkeypatch.setattr(hf_backend, "_generate_batch", spy)
    return sizes


class TestHFBackend:
    async def test_concurrent_requests_are_micro_batched(self, hf_backend, batch_spy):
        same = [chat(f"What is {i} + {i}?", n=2, temperature=0.8, max_tokens=8, seed=i) for i in range(4)]
        other = chat("What is 9 + 9?", temperature=0.3, max_tokens=8)
        results = await asyncio.gather(*(hf_backend.generate(r) for r in [*same, other]))
        # Seeds differ but the sampling is the same: one batch of 4; the other temperature alone.
        assert sorted(batch_spy) == [1, 4]
        assert [len(r) for r in results] == [2, 2, 2, 2, 1]
        for request, completions in zip([*same, other], results, strict=True):
            for c in completions:
                assert c.prompt_tokens == hf_backend.count_prompt_tokens(request)
                assert 0 < c.completion_tokens <= 8

    async def test_batched_greedy_matches_alone(self, hf_backend, batch_spy):
        """Left padding must not change what a request generates."""
        short, long = chat("Hi.", temperature=0.0, max_tokens=10), chat(QUESTION * 3, temperature=0.0, max_tokens=10)
        alone = [(await hf_backend.generate(r))[0].text for r in (short, long)]
        together = [r[0].text for r in await asyncio.gather(*(hf_backend.generate(r) for r in (short, long)))]
        assert batch_spy == [1, 1, 2]
        assert together == alone

    async def test_n_completions_and_token_accounting(self, hf_backend):
        await _check_n_and_accounting(hf_backend)

    async def test_seed_reproducibility(self, hf_backend):
        await _check_seeds(hf_backend)

    async def test_stop_strings(self, hf_backend):
        await _check_stop_strings(hf_backend)

    async def test_exact_count_when_the_model_ends_its_turn(self, hf_backend):
        out = (await hf_backend.generate(chat("Say hi.", temperature=0.0, max_tokens=200)))[0]
        assert out.finish_reason == "stop"
        assert out.completion_tokens == hf_backend.count_tokens(out.text) + 1

    async def test_too_long_prompt(self, hf_backend, batch_spy):
        with pytest.raises(PromptTooLongError, match="context window is 8192"):
            await hf_backend.generate(chat("apple " * 8200))
        assert batch_spy == []  # refused before reaching the model

    async def test_lora_per_request(self, hf_backend, batch_spy, tmp_path, small_model_dir):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoConfig, AutoModelForCausalLM

        # A random (non-zero) adapter: enough to change what the model says.
        torch.manual_seed(0)
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(small_model_dir))
        config = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(skeleton, config).save_pretrained(tmp_path / "adapter")
        del skeleton

        base = chat("Name a color.", temperature=0.0, max_tokens=8)
        with_lora = GenerationRequest(messages=base.messages, sampling=base.sampling, lora=str(tmp_path / "adapter"))
        before = (await hf_backend.generate(base))[0].text
        tuned, plain = await asyncio.gather(hf_backend.generate(with_lora), hf_backend.generate(base))
        assert tuned[0].text != before
        assert plain[0].text == before  # base requests run with the adapter disabled
        assert sorted(batch_spy) == [1, 1, 1]  # adapter and base requests never share a batch


# ------------------------------------------------------------------ OpenAIBackend + vLLM server


@pytest.fixture(scope="module")
async def openai_backend(vllm_server):
    from aft_graph.backends import OpenAIBackend

    backend = OpenAIBackend(vllm_server)
    yield backend
    await backend.aclose()


@pytest.mark.vllm
class TestOpenAIBackendOnVLLMServer:
    async def test_server_facts_are_read_lazily(self, openai_backend, small_model_dir):
        await openai_backend.connect()
        assert openai_backend.model == str(small_model_dir)  # the first (only) model served
        assert openai_backend.context_window == 2048  # vLLM's max_model_len
        assert openai_backend.tokenizer is not None  # the model name is a local directory

    async def test_n_completions_and_token_accounting(self, openai_backend):
        await _check_n_and_accounting(openai_backend)

    async def test_seed_reproducibility(self, openai_backend):
        await _check_seeds(openai_backend)

    async def test_stop_strings(self, openai_backend):
        await _check_stop_strings(openai_backend)

    async def test_exact_count_when_the_model_ends_its_turn(self, openai_backend):
        out = (await openai_backend.generate(chat("Say hi.", temperature=0.0, max_tokens=200)))[0]
        assert out.finish_reason == "stop"
        assert out.completion_tokens == openai_backend.count_tokens(out.text) + 1

    async def test_raw_prompt_with_top_k(self, openai_backend):
        request = GenerationRequest(prompt="The capital of France is", sampling=Sampling(n=2, max_tokens=6, top_k=5, seed=0))
        out = await openai_backend.generate(request)
        assert len(out) == 2 and all(0 < c.completion_tokens <= 6 for c in out)
        assert out[0].prompt_tokens == openai_backend.count_prompt_tokens(request)

    async def test_too_long_prompt_locally_and_from_the_server(self, openai_backend, vllm_server):
        from aft_graph.backends import OpenAIBackend

        with pytest.raises(PromptTooLongError, match="context window is 2048"):
            await openai_backend.generate(chat("apple " * 2100))
        # Without a local tokenizer the server's own rejection is recognised.
        blind = OpenAIBackend(vllm_server)
        await blind.connect()
        blind.tokenizer = None
        with pytest.raises(PromptTooLongError, match="maximum context length is 2048"):
            await blind.generate(chat("apple " * 2100))
        await blind.aclose()

    async def test_round_robin_over_replicas(self, vllm_server):
        from aft_graph.backends import OpenAIBackend

        # The same server under two names stands in for two replicas.
        replicas = [vllm_server, vllm_server.replace("127.0.0.1", "localhost")]
        backend = OpenAIBackend(replicas)
        used: list[int] = []
        for i, client in enumerate(backend._clients):
            create = client.chat.completions.create

            async def spy(*args, _i=i, _create=create, **kwargs):
                used.append(_i)
                return await _create(*args, **kwargs)

            client.chat.completions.create = spy
        await asyncio.gather(*(backend.generate(chat(max_tokens=4, seed=i)) for i in range(4)))
        assert sorted(used) == [0, 0, 1, 1]
        await backend.aclose()
