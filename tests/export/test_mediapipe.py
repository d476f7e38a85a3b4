"""MediaPipe Tasks `ImageEmbedder` gives the LiteRT interpreter's embedding for a uint8 image."""

import numpy as np
import pytest

mediapipe = pytest.importorskip(
    "mediapipe", reason="mediapipe is not installed (pip install mediapipe; test extra)")


@pytest.mark.parametrize("quantization", ["float32", "int8"])
def test_mediapipe_image_embedder_matches_litert(exported, quantization):
    from ai_edge_litert.interpreter import Interpreter
    from mediapipe.tasks.python import BaseOptions, vision

    path = exported["paths"][f"tflite_{quantization}"]
    images = exported["images"][:3]
    interpreter = Interpreter(model_path=path)
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    options = vision.ImageEmbedderOptions(base_options=BaseOptions(model_asset_path=path),
                                          l2_normalize=False, quantize=False)
    with vision.ImageEmbedder.create_from_options(options) as embedder:
        for image in images:
            interpreter.set_tensor(inp["index"], image[None])
            interpreter.invoke()
            expected = interpreter.get_tensor(out["index"])[0]
            result = embedder.embed(mediapipe.Image(image_format=mediapipe.ImageFormat.SRGB,
                                                    data=np.ascontiguousarray(image)))
            got = np.asarray(result.embeddings[0].embedding, np.float32)
            # same image size as the model: MediaPipe feeds the pixels unchanged
            np.testing.assert_allclose(got, expected, atol=1e-6)
