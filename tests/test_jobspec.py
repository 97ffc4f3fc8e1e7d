from pathlib import Path

import pytest

from elastic.errors import JobSpecError
from elastic.jobspec import load_job_spec, parse_job_spec

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")))
def test_examples_are_valid(path: Path) -> None:
    spec = load_job_spec(path)
    assert spec.id == path.stem


def test_defaults_and_conversion() -> None:
    spec = parse_job_spec({"job": {"task": "t", "rule": "r", "round_timeout": 5}})
    assert spec.round_timeout == 5.0 and isinstance(spec.round_timeout, float)
    assert spec.rounds == 10 and spec.train.batch_size == 32 and spec.checkpoint.every == 1
    assert spec.shard_count == 1
    assert (
        parse_job_spec(
            {"job": {"task": "t", "rule": "r", "min_workers": 2, "max_workers": 5}}
        ).shard_count
        == 5
    )


@pytest.mark.parametrize(
    "data, words",
    [
        ({"job": {"rule": "r"}}, ["[job] task is missing", 'task = "digits"']),
        (
            {"job": {"task": "t", "rule": "r", "roundz": 3}},
            ["unknown key 'roundz'", "did you mean 'rounds'"],
        ),
        (
            {"job": {"task": "t", "rule": "r", "rounds": 0}},
            ["rounds = 0 is invalid", "positive integer"],
        ),
        ({"job": {"task": "t", "rule": "r", "rounds": "ten"}}, ["rounds must be int", "'ten'"]),
        ({"job": {"task": "t", "rule": "r", "fraction": 1.5}}, ["fraction = 1.5", "(0, 1]"]),
        (
            {"job": {"task": "t", "rule": "r", "min_workers": 3, "max_workers": 2}},
            ["max_workers = 2 is below min_workers = 3"],
        ),
        (
            {"job": {"task": "t", "rule": "r"}, "trian": {}},
            ["unknown table [trian]", "did you mean 'train'"],
        ),
        (
            {"job": {"task": "t", "rule": "r"}, "train": {"optimizer": "rmsprop"}},
            ["optimizer = 'rmsprop'", '"sgd"'],
        ),
        ({"job": {"task": "t", "rule": "r", "id": "bad id!"}}, ["id = 'bad id!' is invalid"]),
    ],
)
def test_errors_name_the_key_and_the_fix(data: dict, words: list[str]) -> None:
    with pytest.raises(JobSpecError) as err:
        parse_job_spec(data, source="spec.toml")
    text = str(err.value)
    assert text.startswith("spec.toml: ")
    for word in words:
        assert word in text


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(JobSpecError, match="does not exist"):
        load_job_spec(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[job\ntask=")
    with pytest.raises(JobSpecError, match="not valid TOML"):
        load_job_spec(bad)


def test_validate_says_when_shards_outnumber_workers(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from elastic.cli.main import main

    job = tmp_path / "wide.toml"
    job.write_text('[job]\ntask = "linreg"\nrule = "fedavg"\nmin_workers = 3\npartitions = 30\n')
    assert main(["validate", str(job)]) == 0
    out = capsys.readouterr().out
    assert "note: the data is in 30 shards (partitions), one a worker" in out
    job.write_text('[job]\ntask = "linreg"\nrule = "syncavg"\nmin_workers = 3\npartitions = 30\n')
    assert main(["validate", str(job)]) == 0
    assert "note:" not in capsys.readouterr().out  # gradient rules split by rank
