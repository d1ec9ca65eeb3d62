"""The admin's record-a-prompt line on a real Asterisk 22: dial, speak after the tone, press #."""

from __future__ import annotations

import time
import wave

import pytest

from calmline.config import Config

pytestmark = pytest.mark.asterisk


def test_admin_records_a_prompt_by_phone_and_install_keeps_it(lab):
    from asterisk_lab import SOUNDS

    names = Config().prompt_names()
    prompt = "calmline/record-saved"
    extension = f"*78{names.index(prompt) + 1:02d}"
    target = SOUNDS / "en" / f"{prompt}.wav"
    shipped = target.read_bytes()
    try:
        mark = lab.ami.mark()
        response = lab.ami.manager.originate(
            "Local/record@sim-admin/n", extension, context="calmline-admin", priority="1", run_async=True
        )
        assert response.get_header("Response") == "Success"
        lab.ami.wait_idle(mark, timeout=60)
        time.sleep(0.5)
        recorded = target.read_bytes()
        assert recorded != shipped, "the recording did not replace the prompt"
        with wave.open(str(target)) as w:
            assert (w.getframerate(), w.getnchannels()) == (8000, 1)
            assert w.getnframes() / 8000 > 0.5  # vm-goodbye was spoken into it
        # The admin's recording is theirs: installing the shipped prompts again keeps it.
        kept = lab.calmline("prompts", "install")
        assert "kept your own recording" in kept.stdout and target.read_bytes() == recorded
    finally:
        lab.calmline("prompts", "install", "--force")
    assert target.read_bytes() == shipped
