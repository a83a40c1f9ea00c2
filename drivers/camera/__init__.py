"""Camera driver: frame capture (OpenCV), barcode decoding, debouncing, the scanner thread.

Layers: ``capture`` (frame sources) and ``decoder`` (pure image -> codes) are independent;
``scanner`` owns one source and one pipeline in a thread and reports debounced scans.
``synth`` renders barcode frames for the demo, the tests and the benchmark.
"""
