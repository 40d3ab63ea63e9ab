"""The trainer on the real small model (SmolLM2-135M-Instruct): a short LoRA SFT run whose adapter
is then served by the session's vLLM engine, by HFBackend, and merged into a plain model.

The training set is tiny and the learning rate high, so that a dozen steps change the model for
real: every target starts with the same marker sentence, which the adapted model then writes for a
held-out question while the base model does not.
"""

from __future__ import annotations

import json

import pytest

from aft_graph.backends import GenerationRequest, Sampling
from aft_graph.prompts import aggregation_messages
from trainer.config import SFTConfig
from trainer.records import AggregationRecord
from trainer.sft import train_sft

pytestmark = pytest.mark.slow

MARKER = "After checking every response"
SUFFIX = "\n\nGive the final answer inside <answer></answer> tags, for example <answer>7</answer>."
STEPS = 6


def _records() -> list[AggregationRecord]:
    out = []
    for i, (a, b) in enumerate([(1, 2), (3, 4), (2, 6), (5, 3), (4, 4), (6, 1), (2, 7), (3, 5)]):
        out.append(
            AggregationRecord(
                id=f"r{i}#0",
                query_id=f"r{i}",
                question=f"Calculate {a} + {b}.{SUFFIX}",
                answer=str(a + b),
                task="basic_arithmetic",
                proposals=[f"{a} + {b} = {a + b + 1}", f"The answer is <answer>{a + b}</answer>"],
                target=f"{MARKER}: {a} + {b} = {a + b}. <answer>{a + b}</answer>",
            )
        )
    return out


HELD_OUT = aggregation_messages(
    f"Calculate 4 + 5.{SUFFIX}", ["4 + 5 = 8", "The answer is <answer>9</answer>"]
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_model_dir):
    out = tmp_path_factory.mktemp("aft-sft")
    config = SFTConfig(
        model=str(small_model_dir),
        data=(out / "unused.jsonl",),
        output_dir=out,
        max_steps=STEPS,
        batch_size=4,
        learning_rate=3e-3,
        lora_r=8,
        lora_alpha=16,
        save_steps=STEPS // 2,
        lr_scheduler="constant",
    )
    return config, train_sft(config, records=_records(), show_progress=False)


def greedy(messages, lora=None, max_tokens=24) -> GenerationRequest:
    return GenerationRequest(
        messages=tuple(messages), sampling=Sampling(temperature=0.0, max_tokens=max_tokens), lora=lora
    )


def test_loss_goes_down(trained):
    _, result = trained
    assert result.steps == STEPS and len(result.losses) == STEPS
    assert result.last_loss < 0.5 * result.first_loss, result.losses
    log = json.loads((result.output_dir / "sft_log.json").read_text())
    assert log["examples"] == 8 and log["steps"] == STEPS


def test_adapter_weights_changed_from_init(trained):
    from safetensors.torch import load_file

    _, result = trained
    info = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert info["r"] == 8 and set(info["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    weights = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert len(lora_b) == 4 * 30  # q/k/v/o in each of the 30 layers
    # peft starts every lora_B at zero: non-zero means training moved them.
    assert all(float(w.abs().max()) > 0 for w in lora_b)


def test_resume_from_checkpoint(trained):
    config, result = trained
    assert (result.output_dir / "checkpoints" / f"checkpoint-{STEPS}").is_dir()
    more = config.model_copy(update={"max_steps": STEPS + 1})
    again = train_sft(more, records=_records(), show_progress=False)
    assert again.resumed_from is not None and again.resumed_from.endswith(f"checkpoint-{STEPS}")
    assert again.steps == STEPS + 1
    # The log history of the first run came back with the checkpoint.
    assert [s for s, _ in again.losses][:STEPS] == list(range(1, STEPS + 1))
    # A finished run is not trained further when run again.
    done = train_sft(more, records=_records(), show_progress=False)
    assert done.steps == STEPS + 1 and done.losses == again.losses


def test_second_stage_continues_the_adapter(trained, tmp_path):
    import shutil

    from safetensors.torch import load_file

    config, result = trained
    # Shipped adapters name their base model instead of a path on this machine.
    named = shutil.copytree(result.adapter_dir, tmp_path / "named")
    info = json.loads((named / "adapter_config.json").read_text())
    base_path = info["base_model_name_or_path"]
    info["base_model_name_or_path"] = "SmolLM2-135M-Instruct"
    (named / "adapter_config.json").write_text(json.dumps(info))
    second = config.model_copy(
        update={"output_dir": tmp_path / "out", "max_steps": 2, "save_steps": 2,
                "init_adapter": str(named), "lora_r": 4, "target_modules": ("q_proj",)}
    )
    again = train_sft(second, records=_records(), show_progress=False)
    # It starts where the first stage ended (a fresh adapter starts at the base model's loss) ...
    assert again.first_loss < 0.5 * result.first_loss, (again.losses, result.losses)
    # ... with the first stage's shape, not the config's lora_r / target_modules ...
    info = json.loads((again.adapter_dir / "adapter_config.json").read_text())
    assert info["r"] == 8 and len(info["target_modules"]) == 4
    assert info["base_model_name_or_path"] == base_path  # export finds the base weights
    # ... and trains it further.
    before = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    after = load_file(str(again.adapter_dir / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not bool((before[k] == after[k]).all()) for k in before)


def test_second_stage_names_a_missing_adapter(trained, tmp_path):
    config, _ = trained
    bad = config.model_copy(update={"output_dir": tmp_path, "init_adapter": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match="not a LoRA adapter directory"):
        train_sft(bad, records=_records(), show_progress=False)


@pytest.mark.vllm
async def test_adapter_served_by_vllm_per_request(trained, vllm_backend):
    _, result = trained
    adapter = str(result.adapter_dir)
    (base,) = await vllm_backend.generate(greedy(HELD_OUT))
    (tuned,) = await vllm_backend.generate(greedy(HELD_OUT, lora=adapter))
    assert tuned.text != base.text
    assert tuned.text.startswith(MARKER), tuned.text
    assert not base.text.startswith(MARKER)
    # Base requests are untouched by the adapter being resident.
    (base_again,) = await vllm_backend.generate(greedy(HELD_OUT))
    assert base_again.text == base.text


async def test_adapter_in_hf_backend_and_merged_model(trained, small_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aft_graph.backends import HFBackend
    from aft_graph.models import resolve_model
    from trainer.export import export_merged

    _, result = trained
    hf = HFBackend(small_model_dir, adapters={"aft": str(result.adapter_dir)})
    try:
        (base,) = await hf.generate(greedy(HELD_OUT))
        (tuned,) = await hf.generate(greedy(HELD_OUT, lora="aft"))
    finally:
        await hf.aclose()
    assert tuned.text != base.text and tuned.text.startswith(MARKER), tuned.text

    merged = export_merged(result.adapter_dir, tmp_path / "merged")
    assert resolve_model(merged) == merged  # a plain model path for every backend
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    text = tok.apply_chat_template(list(HELD_OUT), tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        ids = model.generate(**enc, max_new_tokens=24, do_sample=False)
    merged_text = tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert merged_text.startswith(MARKER), merged_text
    assert merged_text.strip() == tuned.text.strip()
