"""Camera driver: frame sources, the barcode pipeline, the camera process and its supervisor.

* ``source`` / ``capture`` / ``scenes`` -- frame sources: V4L2, video files, globs, generated
  cameras (``synth:``).
* ``backends`` (zxing-cpp, zbar; each optional) -> ``regions`` (views of a frame) ->
  ``arbiter`` (+ ``bars``, the pixel check) = ``decoder.BarcodePipeline``: image in, the codes
  it surely holds out. ``cabinet-agent decode`` and the camera use the same one.
* ``schedule`` (which frames to decode) and ``loop`` (source + pipeline -> messages) run in
  the camera's child process (``child``); ``scanner.CameraScanner`` supervises it from the
  daemon, debounces (``debounce``) and calls back with scans, faults and recoveries.
* ``synth`` renders barcode frames and ``corpus`` scores a pipeline on labelled real photos,
  for the demo, the tests and the benchmark.
"""
