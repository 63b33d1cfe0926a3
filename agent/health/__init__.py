"""Board health: thermal zones, throttle flags, power rails, and the governor that acts on them."""
