"""The bundled demo model answers from what it learned, through the whole runtime."""

from edgeav.runtime import DEMO_CLIP, Runtime


def test_demo_model_names_the_sounding_object_of_the_demo_clip():
    # The bundled clip: a blue diamond (the horn class) sounds from 1 to 6 s next to two silent objects.
    result = Runtime.demo().run(DEMO_CLIP, "ave")
    assert [event.label for event in result.events] == ["horn"]
