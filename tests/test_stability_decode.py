"""Static-cache decoding (the 200m preset's `rl.decode_cache: static`) must decode exactly what dynamic decoding does.

On CUDA Hugging Face compiles the static decode step into CUDA graphs; CPU cannot run those, so the compiled path is
checked here with inductor on CPU (HFEngine.compile_on_cpu): same graph capture (fullgraph, no graph breaks), same
tokens. Its speed is measured on the GPU box by bench/bench_stability_step.py.
"""

import pytest
import torch

from openrlhf_gmpo.countdown.tasks import generate_tasks
from openrlhf_gmpo.countdown.tokenizer import build_tokenizer
from openrlhf_gmpo.stability.data import encode_prompt
from openrlhf_gmpo.stability.hf_engine import PROMPT_BUCKET, HFEngine


def _engine(decode_cache: str, experts: str | None = None, sharpen: bool = False) -> HFEngine:
    tokenizer = build_tokenizer()
    ids = {"eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.pad_token_id}
    engine = HFEngine(
        model_size="tiny", vocab_size=len(tokenizer), seed=3, device="cpu", decode_cache=decode_cache, **ids
    )
    if experts is not None:
        engine.model.set_experts_implementation(experts)
    if sharpen:  # larger weights: a random model's greedy tokens then depend on the context, not one constant token
        with torch.no_grad():
            for param in engine.model.parameters():
                param.mul_(8.0)
    return engine


def _prompts(seed: int = 5) -> list[list[int]]:
    tokenizer = build_tokenizer()
    # 3- and 4-number tasks: prompt lengths differ, so rows carry different amounts of left padding
    return [encode_prompt(tokenizer, t) for t in generate_tasks(12, seed=seed, min_numbers=3, max_numbers=4)]


def _greedy(engine: HFEngine, prompts, new_tokens: int = 24):
    batch = engine.generate(prompts, max_new_tokens=new_tokens, greedy=True, seed=0)
    # Compare what the RL loop uses: each row's response tokens under its action mask (the prompt width differs).
    return batch.response_ids * batch.action_mask, batch


def test_static_cache_pads_prompts_to_a_bucket_and_decodes_the_same_tokens():
    prompts = _prompts()
    torch.manual_seed(0)
    dynamic, _ = _greedy(_engine("dynamic"), prompts)
    static, batch = _greedy(_engine("static"), prompts)
    assert batch.prompt_len % PROMPT_BUCKET == 0 and batch.prompt_len >= max(len(p) for p in prompts)
    assert torch.equal(static, dynamic)


def test_compiled_static_decoding_captures_one_full_graph_and_matches_eager(monkeypatch):
    # grouped_mm experts, as the engine runs them on CUDA, decode loop included (HF's eager experts loop over a
    # data-dependent expert list and cannot be captured in one graph; the engine uses them only on CPU, where nothing
    # is compiled).
    experts = "grouped_mm"
    monkeypatch.setattr(HFEngine, "compile_on_cpu", True)
    prompts = _prompts()
    other_prompts = _prompts(seed=6)
    dynamic = _engine("dynamic", experts, sharpen=True)
    reference, _ = _greedy(dynamic, prompts)
    other_reference, _ = _greedy(dynamic, other_prompts)
    engine = _engine("static", experts, sharpen=True)
    first, _ = _greedy(engine, prompts)  # compiles (fullgraph=True: a graph break raises here)
    (cache,) = engine._static_caches.values()
    # Other prompts of the same shape: the same cache, reset in place (stale keys of the first call would change the
    # tokens), and the compiled step reused.
    second, _ = _greedy(engine, other_prompts)
    assert list(engine._static_caches.values()) == [cache]
    assert torch.equal(first, reference)
    assert torch.equal(second, other_reference)
    assert not torch.equal(first, second)


def test_decoding_keeps_grouped_mm_experts_on_accelerators(monkeypatch):
    from openrlhf_gmpo.stability.hf_engine import keep_experts_implementation_while_decoding

    model = _engine("dynamic", "grouped_mm").model
    # What generate() does around its decode loop, as it would on a GPU: Hugging Face swaps in batched_mm there.
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    with model._optimize_model_for_decode():
        assert set(model.get_experts_implementation().values()) == {"batched_mm"}
    keep_experts_implementation_while_decoding(model)
    with model._optimize_model_for_decode():
        assert set(model.get_experts_implementation().values()) == {"grouped_mm"}


def test_sampling_with_a_static_cache_is_seeded_and_stops_at_eos():
    engine = _engine("static")
    prompts = _prompts()
    a = engine.generate(prompts, max_new_tokens=16, greedy=False, seed=7)
    b = engine.generate(prompts, max_new_tokens=16, greedy=False, seed=7)
    assert torch.equal(a.input_ids, b.input_ids)
    # after the first EOS a row is padding and outside the action mask
    eos = engine.eos_id
    for row, mask in zip(a.response_ids, a.action_mask, strict=True):
        hits = (row == eos).nonzero()
        if len(hits):
            assert mask[: hits[0] + 1].all() and not mask[hits[0] + 1 :].any()


def test_unknown_decode_cache_is_refused_by_name():
    with pytest.raises(ValueError, match="'paged'"):
        _engine("paged")
