"""Launcher settings of the AsyncAPI tests (see asyncapi_fleet_agents): two buses with
their own prefixes, a RabbitMQ and a Kafka broker, DSNs with passwords."""
BUS = {
    'main': {'backend': 'microagent_backends.RedisSignalBus',
             'dsn': 'redis://:s3cret@redis.shop.internal:6379/2', 'prefix': 'SHOP'},
    'audit': {'backend': 'microagent.tools.redis.RedisSignalBus',
              'dsn': 'rediss://svc:s3cret@audit.shop.internal:6380/0', 'prefix': 'AUDIT'},
}
BROKER = {
    'rabbit': {'backend': 'microagent_backends.AMQPBroker',
               'dsn': 'amqp://shop:s3cret@rabbit.shop.internal:5672/shop?heartbeat=30'},
    'kafka': {'backend': 'microagent_backends.KafkaBroker',
              'dsn': 'kafka://kafka.shop.internal:9092'},
}
AGENT = {
    'shop': {'backend': 'tests_support.asyncapi_fleet_agents.Shop',
             'bus': 'main', 'broker': 'rabbit'},
    'warehouse': {'backend': 'tests_support.asyncapi_fleet_agents.Warehouse',
                  'bus': 'main', 'broker': 'rabbit'},
    'invoicer': {'backend': 'tests_support.asyncapi_fleet_agents.Invoicer',
                 'bus': 'main', 'broker': 'kafka'},
    'billing': {'backend': 'tests_support.asyncapi_fleet_agents.Billing',
                'bus': 'audit', 'broker': 'kafka'},
    'auditor': {'backend': 'tests_support.asyncapi_fleet_agents.Auditor',
                'bus': 'audit', 'broker': 'kafka'},
}
