import pytest

from serlens.errors import WeightsError
from serlens.models.resolve import parse_source, resolve_weights


def test_hub_weights_missing_offline_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError) as info:
        resolve_weights("hf:openai/whisper-large-v2", tmp_path)
    message = str(info.value)
    assert "huggingface-cli download openai/whisper-large-v2" in message and "local:" in message


def test_local_folder_must_hold_a_model(tmp_path):
    with pytest.raises(WeightsError, match="no config.json"):
        resolve_weights(f"local:{tmp_path}", tmp_path)


@pytest.mark.parametrize("source", ["openai/whisper-base", "hf:", "bundled"])
def test_unknown_sources_are_refused(source):
    with pytest.raises(WeightsError, match="not understood"):
        parse_source(source)
