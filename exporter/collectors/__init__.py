"""One collector per source. Each yields fresh metric families per scrape from data that
background threads keep current (or from files), so that a scrape never waits on hardware."""
