"""The trainers must run without tqdm (the GPU image lacks it)."""

import subprocess
import sys


def test_progress_bar_without_tqdm_is_silent_and_complete() -> None:
    code = (
        "import sys; sys.modules['tqdm'] = None; sys.modules['tqdm.auto'] = None\n"
        "from jaxbench.progress import progress_bar\n"
        "assert list(progress_bar(range(4), desc='x', leave=False)) == [0, 1, 2, 3]\n"
        "with progress_bar(total=10, unit='B') as bar:\n"
        "    bar.update(5)\n"
        "import jaxbench.train, jaxbench.data, torch_ref.train\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert out.stderr == ""
