"""`python -m scheduler.service`: the service with settings from the environment (CORRAL_*) and CORRAL_CONFIG."""

from scheduler.service.assemble import serve
from scheduler.service.settings import ServiceSettings

serve(ServiceSettings())
