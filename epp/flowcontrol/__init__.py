"""Request management in the EPP: saturation detection, admission and flow control.

``epp.flowcontrol.config`` turns the ``flowControl``/``saturationDetector``/
``featureGates`` sections and the flow-control plugins of an EndpointPickerConfig into
a ``FlowControlSetup``; ``epp.flowcontrol.admission`` applies it to each request.
"""
