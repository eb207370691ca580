"""Reading and writing clips and still images for the CLI and the Python API.

Arrays are uint8 RGB: a clip is (T, H, W, 3), an image (H, W, 3).

Writing (`write_clip`, by the suffix of the path; every write goes to a temporary name in the same folder and is
renamed into place, so a crash never leaves half a file under the real name; missing parent folders are created):

- `.gif` (PIL): loops forever, each frame shown 1000/fps ms (GIF stores centiseconds, so 8 fps is 120 ms).
  Colours are exact whenever the whole clip has at most 255 distinct colours (one shared palette, no dithering),
  as the flat-coloured frames of the built-in worlds do; otherwise each frame with at most 255 colours keeps
  its own exact palette and a frame with more is quantised (median cut, 255 colours, no dithering).
  Identical consecutive frames stay separate frames (PIL would merge them into one longer frame, changing T).
- `.mp4` (H.264): through imageio's ffmpeg plugin (`pip install imageio imageio-ffmpeg`, the `video` extra,
  which bundles an ffmpeg binary), else PyAV (`pip install av`). Without either: ImportError saying what to
  install. The default pixel format is `yuv444p` (crf 17): full colour resolution, any width and height (odd
  ones too), read back at the same size; on 32x32 moving-digits clips the round trip's mean absolute error is
  about 1/255 (tests/test_clip_files.py measures it). `pixel_format="yuv420p"` plays in every player and
  browser (yuv444p H.264 does not play in some, e.g. Safari and Firefox) but halves the colour resolution
  (about 8/255 on the same clips) and needs even sizes. Frames are never rescaled (imageio's macro_block_size
  is 1).
- `.npz`: `videos` uint8 (1, T, H, W, 3); `write_clips_npz` writes N clips with their `prompts`.

Grey input ((T, H, W) or (T, H, W, 1)) is written as RGB with the grey value in all three channels.

Reading (`read_clip`, `read_image`):

- `.gif`, and other PIL formats (.png .jpg .jpeg .webp .bmp .tif .tiff): every frame (a still gives a one-frame
  clip; animated PNG/WebP give all their frames), each the fully composited frame (PIL's iterator handles the
  GIF disposal methods); stills are turned upright by their EXIF orientation.
- `.mp4 .avi .mov .mkv .webm`: imageio's ffmpeg plugin, else PyAV (ImportError naming the install otherwise).
- `.npz`: `videos` (N, T, H, W, C) gives videos[index]; `images` (N, H, W, C) or (N, H, W) a one-frame clip of
  images[index].

Colour conversion on reading: grey becomes RGB (the value repeated), 16-bit grey keeps its high byte, palettes
are expanded, and transparency (RGBA, LA, palette or tRNS transparency, a 4th npz channel) is composited over
**black**: a fully transparent pixel reads as (0, 0, 0), whatever colour is stored under it (`fit_frame` does
the same for an (H, W, 4) array).

Errors: a missing file is FileNotFoundError naming it; an unknown suffix, a corrupt or unreadable file
("<path> is not a GIF patchflow can read: <reason>"), zero frames, an npz without `videos`/`images` (the message
lists the keys it has) or an out-of-range index are ValueError; a missing video backend is ImportError.

The code lives in patchflow/media/, one job a file: formats.py (suffixes, video backend), frames.py (frame arrays,
fit_frame), gif.py, write.py, read.py. This module is the public one: import from here.
"""
from __future__ import annotations

from patchflow.media.formats import IMAGE_SUFFIXES, READ_SUFFIXES, VIDEO_INSTALL, VIDEO_SUFFIXES, WRITE_SUFFIXES
from patchflow.media.frames import fit_frame
from patchflow.media.gif import gif_bytes  # noqa: F401 - serve imports it from here
from patchflow.media.read import read_clip, read_image
from patchflow.media.write import CRF, PIXEL_FORMATS, write_clip, write_clips_npz  # noqa: F401 - CRF, PIXEL_FORMATS

__all__ = ["write_clip", "write_clips_npz", "read_clip", "read_image", "fit_frame", "WRITE_SUFFIXES",
           "READ_SUFFIXES", "VIDEO_SUFFIXES", "IMAGE_SUFFIXES", "VIDEO_INSTALL"]
