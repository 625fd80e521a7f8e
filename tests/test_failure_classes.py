"""Which failed runs are retried: a lost process, node or peer is; a worker's own error is not."""

from types import SimpleNamespace

from fdrl.distributed.trainer import classify


class WorkerHealthCheckFailedError(Exception):  # matched by name, as Ray's own class is
    pass


GLOO_PEER_GONE = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                              "[127.0.0.1]:46999. This is typically caused by a remote worker crashing.")


def failed(**workers) -> SimpleNamespace:
    return SimpleNamespace(worker_failures={int(k[1:]): e for k, e in workers.items()})


def test_a_dead_worker_is_retried_whatever_the_others_say():
    retry, cause, line = classify(failed(r0=GLOO_PEER_GONE, r1=WorkerHealthCheckFailedError("gone")))
    assert retry and isinstance(cause, WorkerHealthCheckFailedError)
    assert line.startswith("worker 1 lost: WorkerHealthCheckFailedError")


def test_a_peer_gone_mid_all_reduce_alone_is_retried():
    """The survivor's collective fails before Ray's health check notices the dead rank."""
    retry, cause, line = classify(failed(r0=GLOO_PEER_GONE))
    assert retry and cause is GLOO_PEER_GONE
    assert line.startswith("a peer of worker 0 lost: ") and "Connection closed by peer" in line


def test_a_workers_own_error_beside_collateral_ones_is_the_cause_and_is_not_retried():
    bug = ValueError("loss is nan at step 3")
    retry, cause, line = classify(failed(r0=GLOO_PEER_GONE, r1=bug))
    assert not retry and cause is bug
    assert line == "worker 1: ValueError: loss is nan at step 3"


def test_an_ordinary_runtime_error_is_not_a_lost_peer():
    retry, _, line = classify(failed(r0=RuntimeError("mat1 and mat2 shapes cannot be multiplied")))
    assert not retry and line.startswith("worker 0: RuntimeError: mat1")
