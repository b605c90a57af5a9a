"""CountDown datasets as jsonl files in OpenRLHF's formats.

    train.jsonl, val.jsonl          RL prompts: {"prompt": "Use 44 19 35 to make 28.", "label": "{\"numbers\": ...}"}
                                    (--data.input_key prompt --data.label_key label --data.apply_chat_template)
    sft_train.jsonl, sft_val.jsonl  SFT traces: {"prompt": ..., "response": "<think>...</think><answer>...</answer>"}
                                    (--data.input_key prompt --data.output_key response --data.apply_chat_template)

The RL and SFT training tasks are disjoint, and sft_val holds the traces of the RL validation tasks, so validation
never sees a training task. Same arguments, same bytes.
"""

import json
from pathlib import Path

from openrlhf_gmpo.countdown.prompts import prompt_text, sft_response
from openrlhf_gmpo.countdown.scorer import decode_label, encode_label
from openrlhf_gmpo.countdown.tasks import CountdownTask, generate_tasks

PROMPT_KEY, LABEL_KEY, RESPONSE_KEY = "prompt", "label", "response"
FILES = ("train.jsonl", "val.jsonl", "sft_train.jsonl", "sft_val.jsonl")


def prompt_record(task: CountdownTask) -> dict:
    return {PROMPT_KEY: prompt_text(task), LABEL_KEY: encode_label(task.numbers, task.target)}


def sft_record(task: CountdownTask) -> dict:
    return {PROMPT_KEY: prompt_text(task), RESPONSE_KEY: sft_response(task)}


def write_jsonl(path: Path, records) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_jsonl(path) -> list[dict]:
    """One JSON object per line (blank lines skipped); ValueError names the file and line of a bad one."""
    return [record for _, record in _numbered_records(path)]


def _numbered_records(path) -> list[tuple[int, dict]]:
    """(file line number, object) for every non-blank line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: malformed JSON ({error.msg})") from error
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            records.append((line_number, record))
    return records


def load_tasks(path) -> list[CountdownTask]:
    """The tasks of an RL prompt file (train.jsonl / val.jsonl); errors name the file and line."""
    tasks = []
    for line_number, record in _numbered_records(path):
        try:
            numbers, target = decode_label(record[LABEL_KEY])
        except (KeyError, ValueError) as error:
            raise ValueError(f"{path}:{line_number}: bad CountDown record ({error})") from error
        tasks.append(CountdownTask(tuple(numbers), target))
    return tasks


def write_datasets(
    out_dir, seed: int, n_train: int, n_val: int, n_sft: int, *, progress: bool = False, **generator_settings
) -> dict[str, Path]:
    """Write the four files into out_dir (created if missing); returns {file name: path}."""
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_sft", n_sft)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    tasks = generate_tasks(n_train + n_val + n_sft, seed, progress=progress, **generator_settings)
    train, val, sft = tasks[:n_train], tasks[n_train : n_train + n_val], tasks[n_train + n_val :]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in FILES}
    write_jsonl(paths["train.jsonl"], map(prompt_record, train))
    write_jsonl(paths["val.jsonl"], map(prompt_record, val))
    write_jsonl(paths["sft_train.jsonl"], map(sft_record, _with_progress(sft, progress, "SFT traces")))
    write_jsonl(paths["sft_val.jsonl"], map(sft_record, val))
    return paths


def _with_progress(items, progress: bool, desc: str):
    if not progress:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="trace")
