"""The Docker fixture repeats a build only after buildah's memfd sealing race, once."""

from __future__ import annotations

from tests.launch.test_launch_docker import MEMFD_RACE, build_retrying_memfd_race


def fake_build(log, outcomes):
    """A build that writes the next (exit code, log text) of `outcomes` each time."""
    calls = []

    def build() -> int:
        rc, text = outcomes[len(calls)]
        calls.append(rc)
        log.write_text(text)
        return rc

    return build, calls


def test_memfd_race_gets_exactly_one_more_build(tmp_path):
    log = tmp_path / "build.log"
    record: list[str] = []
    build, calls = fake_build(log, [(125, f"STEP 7/12\nError: {MEMFD_RACE}\n"), (0, "done\n")])
    assert build_retrying_memfd_race(build, log, record) == 0
    assert calls == [125, 0]
    assert record == [str(tmp_path / "build-1.log")]
    assert MEMFD_RACE in (tmp_path / "build-1.log").read_text()


def test_a_second_memfd_failure_is_not_retried_again(tmp_path):
    log = tmp_path / "build.log"
    build, calls = fake_build(log, [(125, MEMFD_RACE), (125, MEMFD_RACE), (0, "")])
    assert build_retrying_memfd_race(build, log, []) == 125
    assert calls == [125, 125]


def test_any_other_build_failure_is_not_retried(tmp_path):
    log = tmp_path / "build.log"
    build, calls = fake_build(log, [(1, "ERROR: No matching distribution found for torch\n"), (0, "")])
    assert build_retrying_memfd_race(build, log, []) == 1
    assert calls == [1]
