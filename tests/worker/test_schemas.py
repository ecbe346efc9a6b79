"""The worker contract's request validation: strict, readable, and safe on hostile bytes."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from typing import Any

import pytest

pytest.importorskip("PIL", reason="needs the worker extra")

from PIL import Image

from gpujobs.worker.schemas import (
    MAX_IMAGE_BYTES,
    MAX_SEED,
    InferenceRequest,
    InferenceResponse,
    InvalidRequest,
    ResponseMetadata,
    Timings,
    parse_request,
    parse_request_json,
)


def encoded(image_format: str = "PNG", size: tuple[int, int] = (96, 64), mode: str = "RGB") -> str:
    buffer = io.BytesIO()
    Image.new(mode, size, (200, 30, 30)).save(buffer, format=image_format)
    return base64.b64encode(buffer.getvalue()).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width×height pixels and holds none: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


IMAGE = encoded()


def refused(data: Any) -> str:
    with pytest.raises(InvalidRequest) as info:
        parse_request(data)
    return str(info.value)


def test_a_minimal_request_takes_the_model_cards_defaults() -> None:
    request = parse_request({"image": IMAGE})
    assert request.layers == 4
    assert request.resolution == 640
    assert request.prompt is None
    assert request.negative_prompt == " "
    assert request.num_inference_steps == 50
    assert request.true_cfg_scale == 4.0
    assert request.seed is None
    assert request.output_format == "png"
    assert request.image_format == "PNG"
    assert request.image_size == (96, 64)


@pytest.mark.parametrize(
    ("image_format", "mode"), [("PNG", "RGBA"), ("JPEG", "RGB"), ("WEBP", "RGB")]
)
def test_png_jpeg_and_webp_are_read_from_their_magic_bytes(image_format: str, mode: str) -> None:
    request = parse_request({"image": encoded(image_format, mode=mode)})
    assert request.image_format == image_format
    assert request.open_image().size == (96, 64)


def test_a_data_url_prefix_and_line_breaks_are_accepted() -> None:
    wrapped = "\n".join(IMAGE[i : i + 76] for i in range(0, len(IMAGE), 76))
    request = parse_request({"image": "data:image/png;base64," + wrapped})
    assert request.image_bytes == base64.b64decode(IMAGE)


def test_every_field_is_taken_when_in_range() -> None:
    request = parse_request(
        {
            "image": IMAGE,
            "layers": 10,
            "resolution": 1024,
            "prompt": "a poster",
            "negative_prompt": None,
            "num_inference_steps": 100,
            "true_cfg_scale": 20,
            "seed": MAX_SEED,
            "output_format": "pptx",
        }
    )
    assert (request.layers, request.resolution, request.seed) == (10, 1024, MAX_SEED)
    assert request.true_cfg_scale == 20.0
    assert request.negative_prompt is None


@pytest.mark.parametrize(
    ("change", "field", "says"),
    [
        ({"image": "this is not base64!"}, "image", "not valid base64"),
        (
            {"image": base64.b64encode(b"just some text, no picture").decode()},
            "image",
            "not an image",
        ),
        ({"image": encoded("GIF")}, "image", "is a GIF"),
        ({"image": encoded("BMP")}, "image", "is a BMP"),
        ({"image": ""}, "image", "is empty"),
        ({"image": 42}, "image", "must be a string"),
        ({"layers": 1}, "layers", "at least 2"),
        ({"layers": 11}, "layers", "at most 10"),
        ({"layers": "4"}, "layers", "must be an integer"),
        ({"layers": True}, "layers", "must be an integer"),
        ({"layers": 4.0}, "layers", "must be an integer"),
        ({"resolution": 800}, "resolution", "640 or 1024"),
        ({"num_inference_steps": 0}, "num_inference_steps", "at least 1"),
        ({"num_inference_steps": 101}, "num_inference_steps", "at most 100"),
        ({"true_cfg_scale": 0.5}, "true_cfg_scale", "at least 1"),
        ({"true_cfg_scale": 21}, "true_cfg_scale", "at most 20"),
        ({"true_cfg_scale": float("nan")}, "true_cfg_scale", "finite"),
        ({"seed": -1}, "seed", "at least 0"),
        ({"seed": 2**63}, "seed", "at most"),
        ({"output_format": "gif"}, "output_format", "'png' or 'pptx'"),
        ({"prompt": "x" * 5000}, "prompt", "at most 4000 characters"),
        ({"steps": 20}, "steps", "not a field"),
    ],
)
def test_each_bad_field_is_named_with_a_readable_reason(
    change: dict[str, Any], field: str, says: str
) -> None:
    message = refused({"image": IMAGE, **change})
    assert message.startswith("invalid request: ")
    assert f"{field}: " in message
    assert says in message
    assert "pydantic" not in message
    assert "Traceback" not in message


def test_all_problems_are_reported_together() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_request({"image": encoded("GIF"), "layers": 1, "resolution": 800, "extra": 1})
    fields = [problem.field for problem in info.value.problems]
    assert fields == ["image", "layers", "resolution", "extra"]


def test_a_missing_image_is_named() -> None:
    assert "image: is required" in refused({"layers": 4})


@pytest.mark.parametrize(
    ("data", "says"), [([1, 2], "an array"), ("image", "a string"), (None, "null")]
)
def test_a_request_that_is_not_an_object_is_refused(data: Any, says: str) -> None:
    assert says in refused(data)


def test_too_many_bytes_is_refused_before_decoding() -> None:
    big = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(MAX_IMAGE_BYTES)).decode()
    assert "MB once decoded" in refused({"image": big})


def test_a_huge_pixel_count_is_refused_from_the_header_alone() -> None:
    bomb = base64.b64encode(png_header_only(100_000, 100_000)).decode()
    message = refused({"image": bomb})
    assert "image: " in message
    assert "too many pixels" in message


def test_a_pixel_count_above_our_cap_but_below_pillows_is_refused_with_the_size() -> None:
    bomb = base64.b64encode(png_header_only(8_000, 6_000)).decode()  # 48 MP
    assert "8000×6000" in refused({"image": bomb})


def test_pillows_global_bomb_limit_is_left_alone() -> None:
    limit = Image.MAX_IMAGE_PIXELS
    refused({"image": base64.b64encode(png_header_only(100_000, 100_000)).decode()})
    assert limit == Image.MAX_IMAGE_PIXELS


def test_an_extreme_aspect_ratio_is_refused() -> None:
    assert "longer side" in refused({"image": encoded(size=(900, 100))})


def test_a_corrupt_png_is_refused_readably() -> None:
    data = bytearray(base64.b64decode(IMAGE))
    data[40] ^= 0xFF  # break a chunk's CRC
    assert "cannot be read" in refused({"image": base64.b64encode(bytes(data)).decode()})


def test_a_truncated_jpeg_fails_when_decoded_with_invalid_request() -> None:
    data = base64.b64decode(encoded("JPEG", size=(256, 256)))
    request = parse_request({"image": base64.b64encode(data[: len(data) // 2]).decode()})
    with pytest.raises(InvalidRequest, match="image: cannot be decoded"):
        request.open_image()


def test_json_text_is_parsed_strictly() -> None:
    request = parse_request_json(json.dumps({"image": IMAGE, "layers": 3}).encode())
    assert request.layers == 3
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        parse_request_json(b"{")
    with pytest.raises(InvalidRequest, match="must be a JSON object"):
        parse_request_json(b"[]")
    with pytest.raises(InvalidRequest, match="layers: must be an integer"):
        parse_request_json(json.dumps({"image": IMAGE, "layers": "3"}))


def test_a_request_validated_directly_still_knows_its_image() -> None:
    request = InferenceRequest.model_validate({"image": IMAGE})
    assert request.image_size == (96, 64)


def test_the_response_leaves_package_out_unless_there_is_one() -> None:
    metadata = ResponseMetadata(
        seed=1,
        resolution=640,
        width=640,
        height=640,
        layers=1,
        steps=2,
        true_cfg_scale=4.0,
        timings=Timings(load_s=1.0, queue_s=0.0, inference_s=2.0, encode_s=0.1),
        device="cpu",
        dtype="float32",
        peak_gpu_memory_bytes=None,
        model="m",
        revision=None,
    )
    plain = InferenceResponse(layers=["x"], metadata=metadata).to_json_dict()
    assert "package" not in plain
    assert plain["metadata"]["peak_gpu_memory_bytes"] is None
    assert plain["metadata"]["timings"] == {
        "load_s": 1.0,
        "queue_s": 0.0,
        "inference_s": 2.0,
        "encode_s": 0.1,
    }
    packaged = InferenceResponse(layers=["x"], metadata=metadata, package="p").to_json_dict()
    assert packaged["package"] == "p"
