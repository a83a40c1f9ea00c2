"""The platform side of mqtt.md (spec/platform.md): reference platform, ingest, signing, fleet."""
