"""Hardware drivers: pure codecs, a serial link, device clients, and simulators speaking spec/serial.md."""
