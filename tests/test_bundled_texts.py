"""The bundled calibration and evaluation texts: present, different, long enough, clean."""

from __future__ import annotations

import pytest

from resources.texts import calibration_text_path, evaluation_text_path


@pytest.fixture(scope="module")
def smol_tokenizer(tokenizer_files):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_files["tokenizer.json"].decode())


@pytest.mark.parametrize("path, min_tokens", [(calibration_text_path, 50_000),
                                              (evaluation_text_path, 20_000)])
def test_text_is_long_enough_and_modest(smol_tokenizer, path, min_tokens):
    text = path().read_text(encoding="utf-8")
    assert len(smol_tokenizer.encode(text, add_special_tokens=False).ids) >= min_tokens
    assert len(text.encode()) < 400_000  # shipped in every install: keep it modest


@pytest.mark.parametrize("path", [calibration_text_path, evaluation_text_path])
def test_text_carries_no_licence_boilerplate(path):
    # Only the public-domain work: a distributor's header or footer (and its trademark)
    # must not ride along.
    text = path().read_text(encoding="utf-8").lower()
    assert "gutenberg" not in text
    assert "license" not in text and "licence" not in text


def test_calibration_and_evaluation_are_different_books():
    calibration = calibration_text_path().read_text(encoding="utf-8")
    evaluation = evaluation_text_path().read_text(encoding="utf-8")
    assert calibration.startswith("PRIDE AND PREJUDICE")
    assert evaluation.startswith("ALICE'S ADVENTURES IN WONDERLAND")
    # no paragraph of one appears in the other
    assert not set(calibration.split("\n\n")) & set(p for p in evaluation.split("\n\n") if len(p) > 40)
