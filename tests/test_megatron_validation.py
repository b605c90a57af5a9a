"""The megatron backend's launch checks (`validate_megatron_args`) and its sample batching (`samples.py`), at their
edges (parallel sizes: test_megatron_parallel.py; checkpoint retention: test_megatron_checkpoints.py).

Each case was a change to the code that the rest of the suite let through (a mutation-testing pass in the seventh
session, docs/architecture.md): a validation or bookkeeping rule could have been dropped or loosened unnoticed.
"""

import json
import re
from types import SimpleNamespace

import pytest


def _megatron_args(**over):
    """A namespace that passes validate_megatron_args: 8 GPUs, tp=pp=ep=etp=1, batch 64 of micro 2."""
    ns = SimpleNamespace
    m = ns(tp=1, pp=1, ep=1, etp=1, routing_replay=False, aux_loss_coef=0.0)
    args = ns(
        megatron=m,
        actor=ns(num_nodes=1, num_gpus_per_node=8, model_name_or_path="/nonexistent/model", entropy_coef=None,
                 aux_loss_coef=0),
        ds=ns(tensor_parallel_size=1, ring_attn_size=1, packing_samples=False, lora=ns(rank=0)),
        train=ns(batch_size=64, micro_batch_size=2, dynamic_batch_enable=False, enable_ema=False),
        algo=ns(kl=ns(use_loss=False, init_coef=0.0)),
        vllm=ns(sync_with_ray=False),
    )  # fmt: skip
    for dotted, value in over.items():
        *path, last = dotted.split("__")
        target = args
        for part in path:
            target = getattr(target, part)
        setattr(target, last, value)
    return args


def _validate(**over):
    from openrlhf_gmpo.megatron.args import validate_megatron_args

    return validate_megatron_args(_megatron_args(**over))


def test_megatron_base_namespace_is_valid():
    _validate()  # the reference the cases below change one field of


@pytest.mark.parametrize(
    "over, message",
    [
        ({"megatron__tp": 0}, "--megatron.tp 0 must be >= 1"),  # 0 would be a ZeroDivisionError, not a message
        ({"megatron__ep": -1}, "--megatron.ep -1 must be >= 1"),  # 8 % -1 == 0 would let ep=-1 through
        ({"megatron__etp": -2}, "--megatron.etp -2 must be >= 1"),
        # tp=3: 8 % 3 != 0, named as a divisibility error (not the Transformer Engine one)
        ({"megatron__tp": 3}, "GPUs are not divisible by tp*pp = 3"),
        # 24 / 8 = 3 samples per rank, not whole micro-batches of 2
        ({"train__batch_size": 24}, "--train.batch_size 24: must split into 8 data-parallel ranks"),
        ({"ds__packing_samples": True}, "--ds.packing_samples True: not supported"),
        ({"train__dynamic_batch_enable": True}, "--train.dynamic_batch_enable True: not supported"),
        ({"train__enable_ema": True}, "--train.enable_ema True: not supported"),
        ({"ds__lora__rank": 8}, "--ds.lora.rank 8: not supported"),
        ({"actor__entropy_coef": 0.01}, "--actor.entropy_coef 0.01: not supported"),
        ({"algo__kl__use_loss": True, "algo__kl__init_coef": 0.01}, "--algo.kl.use_loss True: not supported"),
        ({"actor__aux_loss_coef": 0.01}, "--actor.aux_loss_coef (use --megatron.aux_loss_coef) 0.01: not supported"),
        # 2 nodes x 8 = 16 ranks: batch 48 -> 3 per rank, not whole micro-batches of 2 (8 ranks would give 6: fine)
        ({"actor__num_nodes": 2, "train__batch_size": 48}, "must split into 16 data-parallel ranks"),
    ],
)
def test_megatron_refusals_name_the_flag(over, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        _validate(**over)


def test_kl_use_loss_without_a_coefficient_is_accepted_by_megatron():
    _validate(algo__kl__use_loss=True, algo__kl__init_coef=0.0)  # no KL term at all: nothing unsupported


def test_megatron_routing_replay_with_tp_is_refused(monkeypatch):
    # With Transformer Engine present (the GPU box), tp=2 + routing replay must still be refused.
    import openrlhf_gmpo.megatron.model as model

    monkeypatch.setattr(model, "has_transformer_engine", lambda: True)
    with pytest.raises(SystemExit, match="--megatron.routing_replay with --megatron.tp 2"):
        _validate(megatron__tp=2, megatron__routing_replay=True, ds__tensor_parallel_size=2)


def test_megatron_unreadable_model_config_is_left_to_the_actor(tmp_path):
    # A folder whose config.json is not a model config: AutoConfig raises ValueError; the launcher skips the check.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    _validate(actor__model_name_or_path=str(tmp_path))


# ----------------------------------------------------------------------------------------------------------------
# megatron/samples


def test_left_pad_collate_pads_on_the_left_so_the_response_is_the_last_columns():
    import torch

    from openrlhf_gmpo.megatron.samples import left_pad_collate

    long = {
        "sequences": torch.tensor([5, 6, 7]),
        "attention_mask": torch.tensor([1, 1, 1]),
        "action_mask": torch.tensor([1, 1]),
        "old_log_probs": torch.tensor([-0.1, -0.2]),
        "advantages": torch.tensor([1.0, 1.0]),
        "rollout_log_probs": None,
    }
    short = {"sequences": torch.tensor([8, 9]), "attention_mask": torch.tensor([1, 1]),
             "action_mask": torch.tensor([1]), "old_log_probs": torch.tensor([-0.3]),
             "advantages": torch.tensor([2.0]), "rollout_log_probs": None}  # fmt: skip
    batch = left_pad_collate([long, short])
    # hand-padded: the short row gets one zero on the left in each column group
    assert batch["sequences"].tolist() == [[5, 6, 7], [0, 8, 9]]
    assert batch["attention_mask"].tolist() == [[True, True, True], [False, True, True]]
    assert batch["action_mask"].tolist() == [[True, True], [False, True]]
    assert torch.equal(batch["old_log_probs"], torch.tensor([[-0.1, -0.2], [0.0, -0.3]]))
    assert batch["advantages"].tolist() == [[1.0, 1.0], [0.0, 2.0]]
    assert "rollout_log_probs" not in batch


def test_sequence_key_ignores_padding():
    import torch

    from openrlhf_gmpo.megatron.samples import sequence_key

    # the same valid tokens left-padded by 0 or by 2 columns: the same key (routing is found again after re-batching)
    assert sequence_key(torch.tensor([0, 0, 4, 5]), torch.tensor([0, 0, 1, 1])) == sequence_key(
        torch.tensor([4, 5]), torch.tensor([1, 1])
    )
    assert sequence_key(torch.tensor([4, 5]), torch.tensor([1, 1])) != sequence_key(
        torch.tensor([4, 6]), torch.tensor([1, 1])
    )


def test_a_sample_without_recorded_routing_is_named_not_a_bare_key_error():
    import torch

    from openrlhf_gmpo.megatron.samples import attach_routing, remember_routing

    ids, mask = torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.ones(2, 3, dtype=torch.long)
    store = {}
    remember_routing(store, ids[:1], mask[:1], [torch.zeros(2, 3, 1, dtype=torch.long)])
    samples = [{"sequences": ids[i], "attention_mask": mask[i]} for i in range(2)]
    with pytest.raises(RuntimeError, match=r"no recorded routing for 1 of 2 samples \(1 recorded\)"):
        attach_routing(samples, store)
    attach_routing(samples[:1], store)
    assert samples[0]["routing"].shape == (2, 3, 1)
