"""elastic's first-party plugins: rules, tasks. Registered through the ``elastic``
entry-point group, exactly as a third-party plugin is."""
