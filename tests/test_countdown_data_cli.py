"""Dataset files, the `countdown` CLI, and the SFT recipe script, checked against OpenRLHF's real dataset classes
and argument parser."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from openrlhf_gmpo.cli import main
from openrlhf_gmpo.countdown.cli import MARKER
from openrlhf_gmpo.countdown.data import FILES, load_tasks, read_jsonl, write_datasets
from openrlhf_gmpo.countdown.prompts import prompt_text, sft_response
from openrlhf_gmpo.countdown.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parents[1]
SFT_SCRIPT = REPO / "scripts/moe/countdown_200m_sft.sh"
SIZES = dict(n_train=40, n_val=10, n_sft=30)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("countdown") / "data"
    write_datasets(out, 5, **SIZES)
    return out


def test_same_seed_gives_identical_bytes(data_dir, tmp_path):
    write_datasets(tmp_path / "again", 5, **SIZES)
    write_datasets(tmp_path / "other", 6, **SIZES)
    for name in FILES:
        assert (tmp_path / "again" / name).read_bytes() == (data_dir / name).read_bytes(), name
        assert (tmp_path / "other" / name).read_bytes() != (data_dir / name).read_bytes(), name


def test_splits_are_disjoint_and_sized(data_dir):
    train, val = load_tasks(data_dir / "train.jsonl"), load_tasks(data_dir / "val.jsonl")
    sft = read_jsonl(data_dir / "sft_train.jsonl")
    sft_val = read_jsonl(data_dir / "sft_val.jsonl")
    assert (len(train), len(val), len(sft), len(sft_val)) == (40, 10, 30, 10)
    train_prompts, val_prompts = {prompt_text(t) for t in train}, {prompt_text(t) for t in val}
    sft_prompts = {r["prompt"] for r in sft}
    assert not train_prompts & val_prompts and not train_prompts & sft_prompts and not val_prompts & sft_prompts
    # sft_val holds the worked solutions of exactly the RL validation tasks, in order.
    assert [r["prompt"] for r in sft_val] == [prompt_text(t) for t in val]
    assert [r["response"] for r in sft_val] == [sft_response(t) for t in val]


def _strategy(**data_flags):
    """OpenRLHF's real DeepspeedStrategy (not set up: only its args and is_rank_0 are used by the datasets)."""
    from openrlhf.utils.config import hierarchize
    from openrlhf.utils.deepspeed import DeepspeedStrategy

    flags = {"ds.param_dtype": "bf16", "train.dynamic_batch_enable": False}
    flags.update({f"data.{key}": value for key, value in data_flags.items()})
    return DeepspeedStrategy(args=hierarchize(SimpleNamespace(**flags)))


def test_prompt_file_feeds_openrlhf_prompt_dataset(data_dir, monkeypatch, tmp_path):
    from openrlhf.datasets import PromptDataset
    from openrlhf.datasets.utils import blending_datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    strategy = _strategy(input_key="prompt", label_key="label", apply_chat_template=True)
    dataset = PromptDataset(
        blending_datasets(str(data_dir / "train.jsonl"), strategy=strategy), build_tokenizer(), strategy
    )
    task = load_tasks(data_dir / "train.jsonl")[0]
    datasource, prompt, label, image = dataset[0]
    assert prompt == f"<|user|>{prompt_text(task)}<|end|><|assistant|>"
    assert json.loads(label) == {"numbers": list(task.numbers), "target": task.target}


def test_sft_file_feeds_openrlhf_sft_dataset_with_the_script_flags(data_dir, dry_run, monkeypatch, tmp_path):
    from openrlhf.datasets import SFTDataset
    from openrlhf.datasets.utils import blending_datasets

    from openrlhf_gmpo.countdown.check_sft_args import parse_train_sft_args

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    # The data flags the recipe script passes, parsed by OpenRLHF's real train_sft parser.
    args = parse_train_sft_args(_script_flags(dry_run))
    strategy = _strategy(**vars(args.data))
    tokenizer = build_tokenizer()
    records = blending_datasets(str(data_dir / "sft_train.jsonl"), strategy=strategy)
    dataset = SFTDataset(records, tokenizer, args.data.max_len, strategy, num_processors=1)
    assert len(dataset) == 30  # no trace is dropped as too long for --data.max_len 128
    input_ids, attention_mask, loss_mask = dataset[0]
    first = read_jsonl(data_dir / "sft_train.jsonl")[0]
    # loss_mask marks the positions whose NEXT token is learned: those next tokens are exactly the worked solution
    # and the eos that ends it.
    targets = input_ids[0][1:][loss_mask[0][:-1].bool()]
    assert tokenizer.decode(targets) == first["response"] + "<|end|>"
    assert tokenizer.decode(input_ids[0]) == f"<|user|>{first['prompt']}<|end|><|assistant|>{first['response']}<|end|>"


@pytest.fixture(scope="module")
def dry_run(data_dir):
    """The recipe script run once with DRY_RUN=1 and DATA_DIR=data_dir, one extra flag passed through."""
    import os

    env = dict(os.environ, DRY_RUN="1", DATA_DIR=str(data_dir), PYTHON=str(REPO / ".venv/bin/python"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "tests/stub_site"), env.get("PYTHONPATH")) if p)
    command = ["bash", str(SFT_SCRIPT), "--train.max_epochs", "2"]
    return subprocess.run(command, env=env, capture_output=True, text=True)


def _script_flags(dry_run) -> list[str]:
    """The train_sft flags of the resolved command the dry run printed on its first line."""
    launch = dry_run.stdout.splitlines()[0].split()
    return launch[launch.index("openrlhf.cli.train_sft") + 1 :]


def test_sft_script_dry_run_validates_with_openrlhf_parser(dry_run, data_dir):
    from openrlhf_gmpo.countdown.check_sft_args import parse_train_sft_args

    assert dry_run.returncode == 0, dry_run.stderr[-2000:]
    assert "deepspeed --num_gpus 1 --module openrlhf.cli.train_sft" in dry_run.stdout
    assert f"dataset={data_dir}/sft_train.jsonl" in dry_run.stdout
    assert "epochs=2" in dry_run.stdout  # "$@" passes through and overrides the script's 10
    # The same parser refuses a flag train_sft does not have (argparse exits with status 2).
    with pytest.raises(SystemExit) as exit_info:
        parse_train_sft_args([*_script_flags(dry_run), "--train.no_such_flag", "1"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("gpus, micro_batch", [("2", "64"), ("8", "32")])
def test_sft_script_splits_the_batch_over_the_gpus(data_dir, gpus, micro_batch):
    import os

    # DeepSpeed requires batch = micro-batch x GPUs x accumulation: 256 = 64 x 2 x 2, 32 x 8 x 1.
    env = dict(os.environ, DRY_RUN="1", N_GPUS=gpus, DATA_DIR=str(data_dir), PYTHON=str(REPO / ".venv/bin/python"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "tests/stub_site"), env.get("PYTHONPATH")) if p)
    result = subprocess.run(["bash", str(SFT_SCRIPT)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    flags = _script_flags(result)
    assert flags[flags.index("--train.micro_batch_size") + 1] == micro_batch
    env["N_GPUS"] = "3"
    refused = subprocess.run(["bash", str(SFT_SCRIPT)], env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "N_GPUS=3 must divide the batch of 256" in refused.stderr


def test_sft_script_is_shellcheck_clean():
    result = subprocess.run([str(REPO / ".venv/bin/shellcheck"), str(SFT_SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(
        '{"prompt": "Use 1 2 3 to make 6.", "label": "{\\"numbers\\": [1, 2, 3], \\"target\\": 6}"}\n{"prompt": '
    )
    with pytest.raises(ValueError, match=rf"{path}:2: malformed JSON"):
        read_jsonl(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=rf"{path}:1: expected a JSON object, got list"):
        read_jsonl(path)
    path.write_text('{"prompt": "x", "label": "{\\"numbers\\": [1]}"}\n')
    with pytest.raises(ValueError, match=rf"{path}:1: bad CountDown record"):
        load_tasks(path)
    # Blank lines count: the bad record below is on line 3 of the file, the second record.
    good = '{"prompt": "x", "label": "{\\"numbers\\": [1, 2, 3], \\"target\\": 6}"}'
    path.write_text(good + '\n\n{"prompt": "x", "label": "{\\"numbers\\": [1]}"}\n')
    with pytest.raises(ValueError, match=rf"{path}:3: bad CountDown record"):
        load_tasks(path)


def test_cli_data_refuses_existing_output_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "data"
    argv = ["countdown", "data", "--out", str(out), "--train", "3", "--val", "1", "--sft", "2"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES, MARKER])
    with pytest.raises(SystemExit, match=f"output path {out} exists; pass --overwrite"):
        main(argv)
    assert main([*argv, "--overwrite", "--seed", "1"]) == 0
    assert len(read_jsonl(out / "train.jsonl")) == 3
    assert f"wrote {out / 'train.jsonl'}" in capsys.readouterr().out  # the final path, not the staging folder


def test_cli_overwrite_that_fails_leaves_the_old_output(tmp_path):
    out = tmp_path / "data"
    argv = ["countdown", "data", "--out", str(out), "--train", "3", "--val", "1", "--sft", "2"]
    assert main(argv) == 0
    before = {p.name: p.read_text() for p in out.iterdir()}
    # Numbers 1..1 allow too few distinct tasks: (1, 1, 1) reaches 1-3 and (1, 1, 1, 1) 1-4, 7 tasks in all.
    # Generation fails inside the staging folder.
    with pytest.raises(SystemExit, match="allow at most 7; raise max_value"):
        main([*argv, "--overwrite", "--max-value", "1", "--train", "50"])
    assert {p.name: p.read_text() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no staging folder left behind


def test_cli_removes_the_staging_folder_of_a_killed_run_and_keeps_a_live_ones(tmp_path):
    out = tmp_path / "data"
    argv = ["countdown", "data", "--out", str(out), "--train", "3", "--val", "1", "--sft", "2"]
    # A real run killed with SIGKILL mid-write: no cleanup code runs, its staging folder stays behind.
    big = ["countdown", "data", "--out", str(out), "--train", "1000000"]
    killed = subprocess.Popen([sys.executable, "-m", "openrlhf_gmpo", *big])
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".data.partial-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.kill()
    killed.wait()
    (left,) = tmp_path.glob(".data.partial-*")
    # A staging folder of a process that is still running (this one) is another run's work in progress.
    live = tmp_path / f".data.partial-{os.getpid()}-inprogress"
    live.mkdir()
    assert main(argv) == 0
    assert not left.exists() and live.is_dir()
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES, MARKER])


def test_cli_overwrite_never_replaces_a_folder_it_did_not_write(tmp_path, monkeypatch):
    argv = ["countdown", "data", "--train", "3", "--val", "1", "--sft", "2", "--overwrite"]
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("keep me")
    with pytest.raises(SystemExit, match=f"replaces only a folder these commands wrote .*{mine} is not one"):
        main([*argv, "--out", str(mine)])
    assert (mine / "todo.txt").read_text() == "keep me"
    # The current folder (or a parent of it) is never an output: "--out ." would replace the working directory.
    monkeypatch.chdir(mine)
    for out in (".", ".."):
        with pytest.raises(SystemExit, match=f"--out {re.escape(out)} is the current folder or one of its parents"):
            main([*argv, "--out", out])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"] and (mine / "todo.txt").is_file()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--min-numbers", "2"], "min_numbers must be >= 3"),
        (["--min-numbers", "4", "--max-numbers", "3"], r"min_numbers \(4\) must be <= max_numbers \(3\)"),
        (["--train", "-5"], "--train must be >= 0, got -5"),
    ],
)
def test_cli_impossible_settings_exit_before_writing(tmp_path, flags, message):
    out = tmp_path / "data"
    with pytest.raises(SystemExit, match=message):
        main(["countdown", "data", "--out", str(out), *flags])
    assert not out.exists()


def test_cli_tokenizer_and_tiny_model(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    assert main(["countdown", "tokenizer", "--out", str(tmp_path / "tok")]) == 0
    assert len(AutoTokenizer.from_pretrained(tmp_path / "tok")) == 40
    assert main(["countdown", "model", "--size", "tiny", "--out", str(tmp_path / "model"), "--seed", "1"]) == 0
    config = AutoConfig.from_pretrained(tmp_path / "model")
    assert (config.architectures, config.num_experts, config.num_experts_per_tok) == (["Qwen3MoeForCausalLM"], 8, 1)
    assert (config.pad_token_id, config.eos_token_id) == (0, 2)
    assert (tmp_path / "model" / "tokenizer.json").exists()


def test_cli_all_writes_data_and_model(tmp_path):
    out = tmp_path / "run"
    argv = ["countdown", "all", "--out", str(out), "--train", "4", "--val", "2", "--sft", "3", "--size", "tiny"]
    assert main([*argv, "--seed", "3", "--model-seed", "1"]) == 0
    assert sorted(p.name for p in (out / "data").iterdir()) == sorted(FILES)
    assert (out / "model-tiny" / "model.safetensors").exists() and (out / "model-tiny" / "tokenizer.json").exists()
    assert len(load_tasks(out / "data" / "val.jsonl")) == 2


def test_cli_output_is_readable_by_others_as_the_umask_allows(tmp_path):
    # mkdtemp's staging folder is 0700 and transformers writes model.safetensors 0600: on a cluster's shared storage
    # the nodes' other users could not read them. Under umask 022 folders must be 0755 and files 0644.
    previous = os.umask(0o022)
    try:
        assert main(["countdown", "model", "--size", "tiny", "--out", str(tmp_path / "model")]) == 0
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "model", *(tmp_path / "model").iterdir())}
    assert modes.pop("model") == 0o755 and modes["model.safetensors"] == 0o644
    assert set(modes.values()) == {0o644}
