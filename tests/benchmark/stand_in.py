"""Stand-in runners for the protocol tests: what a real run stores besides its metrics."""

import functools


def stand_in(execute):
    """Wraps a fake `execute(run_spec, train_dir, eval_dir)` so that its result stores the
    run's `resolved_config`, as `runs.train_and_evaluate` does (the cache and the report
    refuse a run without one)."""
    @functools.wraps(execute)
    def wrapped(run_spec, train_dir, eval_dir):
        outcome = execute(run_spec, train_dir, eval_dir)
        return {"resolved_config": run_spec.resolved, **outcome}

    return wrapped
