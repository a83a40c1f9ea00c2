"""What people type: cabinet-agent, cabinetctl, decode."""
