"""The parts before the decoder: vision -> projector on the device (TrtImageEncoder), and the embedding table
(TrtEmbedder), which also writes a decode step's embedding straight into the decoder's input buffer."""
from __future__ import annotations

import numpy as np

from runtime.errors import UserError
from runtime.kv_cache import check_room

from .cuda import Cuda
from .kv_layout import Dims
from .parts import TrtRunner


def nbytes(shape: Dims, dtype: np.dtype) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


class TrtImageEncoder:
    """vision -> projector on the device: [N,3,h,w] -> [N,P,H] float32."""

    def __init__(self, cuda: Cuda, vision: TrtRunner, projector: TrtRunner):
        self.cuda, self.vision, self.projector = cuda, vision, projector
        top = vision.part.max_shape("pixel_values", 0)  # [Nmax,3,h,w]
        self.max_images = top[0]
        vision.set_shapes({"pixel_values": top})
        features = vision.output_shape("image_features")  # [Nmax,P,Dv]
        projector.set_shapes({"image_features": features})
        self.dtypes = {**vision.part.dtypes, "image_embeds": projector.part.dtypes["image_embeds"]}
        self.pixels = cuda.malloc(nbytes(top, self.dtypes["pixel_values"]), "pixel_values")
        self.features = cuda.malloc(nbytes(features, self.dtypes["image_features"]), "image_features")
        self.embeds = cuda.malloc(nbytes(projector.output_shape("image_embeds"), self.dtypes["image_embeds"]),
                                  "image_embeds")

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        if not 1 <= len(pixel_values) <= self.max_images:
            raise UserError(f"{len(pixel_values)} images; the vision engine takes 1..{self.max_images} "
                            "(rebuild with --max-batch)")
        pixels = np.ascontiguousarray(pixel_values, dtype=self.dtypes["pixel_values"])
        stream = self.vision.stream
        self.cuda.upload(self.pixels, pixels, stream)
        self.vision.enqueue({"pixel_values": pixels.shape},
                            {"pixel_values": self.pixels, "image_features": self.features})
        features = self.vision.output_shape("image_features")
        self.projector.enqueue({"image_features": features},
                               {"image_features": self.features, "image_embeds": self.embeds})
        out = np.empty(self.projector.output_shape("image_embeds"), self.dtypes["image_embeds"])  # [N,P,H]
        self.cuda.download(out, self.embeds, stream)
        self.cuda.sync(stream)
        return out.astype(np.float32, copy=False)


class TrtEmbedder:
    """embed engine: ids -> [S,H] on the host, or one token's embedding written to a device address."""

    def __init__(self, cuda: Cuda, runner: TrtRunner):
        self.cuda, self.runner = cuda, runner
        self.ids_dtype = runner.part.dtypes["input_ids"]
        self.out_dtype = runner.part.dtypes["inputs_embeds"]
        self.max_tokens = runner.part.max_shape("input_ids", 0)[1]
        runner.set_shapes({"input_ids": (1, 1)})
        self.hidden = runner.output_shape("inputs_embeds")[-1]
        self.ids = cuda.malloc(self.max_tokens * self.ids_dtype.itemsize, "input_ids")
        self.out = cuda.malloc(self.max_tokens * self.hidden * self.out_dtype.itemsize, "inputs_embeds")
        self.token = cuda.pinned((1, 1), self.ids_dtype)  # decode's id; read by captured graphs at replay

    def to_host(self, token_ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(np.asarray(token_ids).reshape(1, -1), dtype=self.ids_dtype)  # [1,S]
        check_room(0, ids.shape[1], self.max_tokens)
        stream = self.runner.stream
        self.cuda.upload(self.ids, ids, stream)
        self.runner.enqueue({"input_ids": ids.shape}, {"input_ids": self.ids, "inputs_embeds": self.out})
        out = np.empty((ids.shape[1], self.hidden), self.out_dtype)
        self.cuda.download(out, self.out, stream)
        self.cuda.sync(stream)
        return out.astype(np.float32, copy=False)

    def enqueue_token(self, destination: int) -> None:
        """Embed self.token into `destination` (the decoder's inputs_embeds buffer); asynchronous."""
        self.cuda.upload(self.ids, self.token, self.runner.stream)
        self.runner.enqueue({"input_ids": (1, 1)}, {"input_ids": self.ids, "inputs_embeds": destination})
