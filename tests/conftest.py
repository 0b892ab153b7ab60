"""Shared fixtures: one small prepared dataset for the whole session."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session')
def wiki(tmp_path_factory):
    """data_root/wiki_en prepared by prepare.py from the embedded corpus: 300 documents, a 512-token BPE."""
    root = tmp_path_factory.mktemp('data')
    result = subprocess.run([sys.executable, os.path.join(REPO, 'prepare.py'), f'--data_root={root}', '--max_docs=300',
                             '--vocab_size=512'], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    return str(root / 'wiki_en')
