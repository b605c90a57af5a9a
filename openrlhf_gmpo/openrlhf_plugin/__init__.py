"""The one point where openrlhf_gmpo plugs into OpenRLHF 0.11.2 (see docs/openrlhf.md).

- version.py: refuse any OpenRLHF but 0.11.2, loudly.
- loss_adapter.py: our losses behind OpenRLHF's PolicyLoss contract; installation into the actor trainer.
- actor.py: the Ray policy actor whose trainer uses that adapter (imports OpenRLHF's Ray stack; import it lazily).
- presets.py: YAML presets keyed by OpenRLHF flag names.
- launch.py: runs OpenRLHF's own train_ppo_ray main block with narrow hooks.
"""
