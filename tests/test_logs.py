"""Known third-party noise is silenced at its source, and nothing else: each filter drops exactly its message."""
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from beam_influence import logs


@pytest.fixture
def quiet():
    """The filters installed for one test, removed after it."""
    logs.quiet_known_noise()
    logs.quiet_known_noise()  # idempotent: one filter per logger
    yield
    for name in logs._LOGGERS:
        lg = logging.getLogger(name)
        found = [f for f in lg.filters if isinstance(f, logs.KnownNoiseFilter)]
        assert len(found) == 1, name
        lg.removeFilter(found[0])


def _messages(caplog):
    return [r.getMessage() for r in caplog.records]


def test_root_messages_apitools_and_resource(quiet, caplog):
    caplog.set_level(logging.INFO)
    logging.warning("apitools not found, and bigquery client libraries are not available despite the import not "
                    "raising an ImportError.")
    logging.warning("Resource module is not available for current platform, memory usage cannot be fetched.")
    logging.warning("apitools is fine")  # another root message: kept
    logging.getLogger("some.module").warning(  # the same text on another logger is not Beam's: kept
        "apitools not found, and bigquery client libraries are not available")
    want = ["apitools is fine", "apitools not found, and bigquery client libraries are not available"]
    if not logs._resource_available():  # where the message is true it stays
        want.insert(0, logs.RESOURCE)
    assert _messages(caplog) == want


def test_discarding_unparseable_args_only_for_beams_own_store_false_options(quiet, caplog):
    assert {"pipeline_type_check", "direct_runner_use_stacked_bundle"} <= logs.beam_store_false_dests()
    lg = logging.getLogger(logs.OPTIONS_LOGGER)
    lg.warning("Discarding unparseable args: %s", ["--direct_runner_use_stacked_bundle", "--pipeline_type_check"])
    lg.warning("Discarding unparseable args: %s", ["--pipeline_type_check", "--spec=my.module:spec"])  # a user's
    lg.warning("Discarding unparseable args: %s", ["--pipeline_type_check=1"])
    lg.warning("Discarding flag %s, single dash flags are not allowed.", "-f")
    assert _messages(caplog) == ["Discarding unparseable args: ['--pipeline_type_check', '--spec=my.module:spec']",
                                 "Discarding unparseable args: ['--pipeline_type_check=1']",
                                 "Discarding flag -f, single dash flags are not allowed."]


def test_relayed_worker_messages(quiet, caplog):
    lg = logging.getLogger(logs.JOB_SERVICE_LOGGER)

    def relay(message):  # what the job service logs for a worker's log entry (a LogEntry proto as text)
        lg.warning("Worker: %s", f'severity: WARN timestamp {{ seconds: 1 }} message: "{message}" log_location: "x"')

    relay("Discarding unparseable args: [\\'--direct_runner_use_stacked_bundle\\', \\'--pipeline_type_check\\']")
    relay(logs.RESOURCE)
    relay("Discarding unparseable args: [\\'--my_flag\\']")
    relay("No semi_persistent_directory found")
    lg.warning("Discarding unparseable args: ['--pipeline_type_check']")  # not a relayed worker entry: kept
    got = _messages(caplog)
    assert len(got) == 3 + (not logs._resource_available())
    assert "--my_flag" in got[-3] and "semi_persistent_directory" in got[-2] and got[-1].startswith("Discarding")


def test_a_new_process_importing_beam_prints_no_apitools_line():
    code = ("from beam_influence.logs import quiet_known_noise; quiet_known_noise()\n"
            "import logging, apache_beam\nlogging.warning('still shown')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert "apitools" not in out.stderr and "still shown" in out.stderr


def test_orbax_manager_checkpoint_loads_without_step_metadata_warning(tmp_path, caplog):
    """core.checkpoints reads an item's tree metadata only: no 'Metadata file does not exist: …/_CHECKPOINT_METADATA'
    for the item folder of a CheckpointManager step (the cause, not a filter)."""
    import jax
    import orbax.checkpoint as ocp

    from beam_influence.core.checkpoints import load_checkpoint

    params = {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(3, 2), "bias": np.ones(2, np.float32)}}
    with ocp.CheckpointManager(str(tmp_path / "run")) as mgr:
        mgr.save(7, args=ocp.args.StandardSave({"params": params, "step": np.int32(7)}))
        mgr.wait_until_finished()
    caplog.set_level(logging.INFO)
    template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    got = load_checkpoint(str(tmp_path / "run"), template)
    np.testing.assert_array_equal(got["dense"]["kernel"], params["dense"]["kernel"])
    assert not [m for m in _messages(caplog) if "_CHECKPOINT_METADATA" in m or "Metadata file does not exist" in m]
