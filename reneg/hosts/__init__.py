"""The host-independent halves of the UI front-ends.

A web UI's extension file keeps only what needs the web UI itself (gradio components,
callback registration, the script class); everything it decides lives here, in plain
modules that import nothing heavier than torch and are tested without a web UI.
Nothing here imports a web UI's modules or gradio.
"""
