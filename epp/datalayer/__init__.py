"""The data layer: sources that poll or observe endpoints, extractors that turn what
they deliver into endpoint attributes, and the ``dataLayer`` section that wires them.
See ``base`` for the contracts and ``attributes`` for how plugins share data."""
