"""cellstudy.threads: TensorFlow's thread pools split over processes that share the machine."""
import os

import pytest

from cellstudy import runner, threads


def test_threads_per_process_splits_the_cores():
    assert threads.threads_per_process(1, cpus=2) == 2
    assert threads.threads_per_process(2, cpus=2) == 1
    assert threads.threads_per_process(3, cpus=2) == 1      # never 0
    assert threads.threads_per_process(2, cpus=16) == 8
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="n_processes="):
            threads.threads_per_process(bad, cpus=2)
    assert threads.threads_per_process(1) == threads.available_cpus() >= 1


def test_thread_env_only_for_shared_machines_and_keeps_exported_values():
    both = {threads.INTRA_ENV: "1", threads.INTER_ENV: "1"}
    assert threads.thread_env(1, cpus=2, environ={}) == {}          # alone: TensorFlow's default
    assert threads.thread_env(2, cpus=2, environ={}) == both
    assert threads.thread_env(2, cpus=16, environ={}) == {threads.INTRA_ENV: "8", threads.INTER_ENV: "8"}
    # a value the user exported wins; an empty one counts as unset
    assert threads.thread_env(2, cpus=2, environ={threads.INTRA_ENV: "4"}) == {threads.INTER_ENV: "1"}
    assert threads.thread_env(2, cpus=2, environ={threads.INTRA_ENV: ""}) == both


def test_kernel_env_sets_the_threads_for_concurrent_kernels_and_restores(monkeypatch):
    for k in (threads.INTRA_ENV, threads.INTER_ENV):
        monkeypatch.delenv(k, raising=False)
    expected = str(threads.threads_per_process(2))
    with runner.kernel_env(2):
        assert os.environ[threads.INTRA_ENV] == os.environ[threads.INTER_ENV] == expected
        with runner.kernel_env():  # a step's own (re-entrant) entry changes nothing
            assert os.environ[threads.INTRA_ENV] == expected
        assert threads.current() == {threads.INTRA_ENV: expected, threads.INTER_ENV: expected}
    assert threads.INTRA_ENV not in os.environ and threads.INTER_ENV not in os.environ
    with runner.kernel_env(1):
        assert threads.INTRA_ENV not in os.environ
    monkeypatch.setenv(threads.INTRA_ENV, "3")
    with runner.kernel_env(2):
        assert os.environ[threads.INTRA_ENV] == "3" and os.environ[threads.INTER_ENV] == expected
    assert os.environ[threads.INTRA_ENV] == "3" and threads.INTER_ENV not in os.environ


def test_settings_for_reports_what_started_processes_get():
    t = str(threads.threads_per_process(2))
    assert threads.settings_for(1, environ={}) == {threads.INTRA_ENV: None, threads.INTER_ENV: None}
    assert threads.settings_for(2, environ={}) == {threads.INTRA_ENV: t, threads.INTER_ENV: t}
    assert threads.settings_for(2, environ={threads.INTRA_ENV: "4"}) == {threads.INTRA_ENV: "4", threads.INTER_ENV: t}
    assert threads.settings_for(1, environ={threads.INTER_ENV: "2"}) == {threads.INTRA_ENV: None, threads.INTER_ENV: "2"}
