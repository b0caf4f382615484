# Echoel Box: the stack's commands and the factory model store on a technician's shell.
export PATH="$PATH:/opt/echoel/venv/bin"
export ECHOEL_MODEL_STORE=/opt/echoel/models
