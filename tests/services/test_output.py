from __future__ import annotations

from pdserve.services.gateway.output import OutputText


def run(tokenizer, text, stop):
    out = OutputText(tokenizer, stop)
    pieces = [out.push([t]) for t in tokenizer.encode(text)]
    return "".join(pieces) + out.flush(), out.stopped


def test_no_stop_strings_passes_text_through(tokenizer):
    assert run(tokenizer, "The train leaves at noon.", []) == ("The train leaves at noon.", False)


def test_text_ends_before_the_stop_string(tokenizer):
    assert run(tokenizer, "The train leaves at noon. Then", [" at noon"]) == ("The train leaves",
                                                                              True)
    assert run(tokenizer, "one\n\ntwo", ["\n\n", "zzz"]) == ("one", True)


def test_held_back_prefix_is_released_when_no_stop_follows(tokenizer):
    out = OutputText(tokenizer, ["noon!"])
    emitted = "".join(out.push([t]) for t in tokenizer.encode("at noon"))
    assert emitted == "at "  # " noon" could still become "noon!"
    assert emitted + out.flush() == "at noon" and not out.stopped


def test_without_tokenizer_no_text(tokenizer):
    out = OutputText(None, [])
    assert out.push([1, 2]) == "" and out.flush() == ""
