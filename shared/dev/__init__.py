"""What only runs on a developer's machine: the local Functions host and its Event Grid topic,
the Azurite launcher and the demo. The deployed app never imports this package (a test checks
it) and `.funcignore` leaves it out of the Azure package."""
