"""Clip and image files, split by job; the public module is `patchflow.clip_files` (import from there).

formats.py (the suffixes read and written, the video backend)  frames.py (uint8 frame arrays: checks, colour,
fit_frame)  gif.py (exact-colour GIF encoding)  write.py (write_clip, write_clips_npz)  read.py (read_clip,
read_image)  grids.py (several samples tiled into one picture or clip: grid, save_grid)
"""
