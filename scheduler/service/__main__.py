"""`python -m scheduler.service`: the service with settings from the environment (CORRAL_*) and CORRAL_CONFIG."""

from scheduler.service.core.assemble import serve
from scheduler.service.core.settings import ServiceSettings

serve(ServiceSettings())
