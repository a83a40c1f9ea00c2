"""Never runs on a real cabinet: private broker, simulated cabinet, demo. Only agent.cli.main imports it, lazily."""
