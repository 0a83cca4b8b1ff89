"""Alert state: open on the first fire, repeat at an interval, resolve with a duration."""
