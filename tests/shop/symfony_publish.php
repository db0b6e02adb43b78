<?php
/*
 * The shop's publisher, for real: Symfony Messenger's AMQP transport (php-amqp) with the Symfony serializer,
 * dispatching a message class of the shop's shape (App\Application\Message\UpdateUserEmbeddingMessage) through a
 * message bus, as the shop's messenger.yaml configures it. Installed from Debian (see the Makefile's debian-tools).
 *
 * usage: php symfony_publish.php DSN OPTIONS_JSON < events.jsonl
 *   DSN           amqp://guest:guest@127.0.0.1:5672/%2f/user_embedding_updates (the shop's MESSENGER_TRANSPORT_DSN)
 *   OPTIONS_JSON  the transport's `options:` block as JSON (auto_setup, exchange, queues, confirm_timeout, ...)
 *   stdin         one event per line: {"userId", "eventType", "searchPhrase", "productId", "occurredAt", "metadata"}
 *                 optional "repeat": N dispatches the same message N times; "sleepMs" pauses before it
 * stdout          one line per dispatch: "ok <messageId>" or "error <class>: <message>" (the shop catches and logs)
 * RECORD=FILE     also append each published body (as the serializer encodes it) to FILE, for `myshop verify`
 * FAILED=OPTIONS_JSON  the PHP worker gave up on each message instead: Symfony's own listeners (error details,
 *                 send to the failure transport) put it on the failure transport these options configure (the
 *                 shop's `failure_transport: failed`), as its worker does after the last retry
 */

declare(strict_types=1);

namespace App\Domain {
    enum EventType: string
    {
        case SEARCH = 'search';
        case PRODUCT_VIEW = 'product_view';
        case PRODUCT_CLICK = 'product_click';
        case PRODUCT_PURCHASE = 'product_purchase';

        public function weight(): float
        {
            return match ($this) {
                self::PRODUCT_PURCHASE => 1.0,
                self::SEARCH => 0.7,
                self::PRODUCT_CLICK => 0.5,
                self::PRODUCT_VIEW => 0.3,
            };
        }
    }
}

namespace App\Application\Message {
    use App\Domain\EventType;

    final readonly class UpdateUserEmbeddingMessage
    {
        public string $messageId;

        public function __construct(
            public string $userId,
            public EventType $eventType,
            public ?string $searchPhrase,
            public ?int $productId,
            public \DateTimeImmutable $occurredAt,
            public array $metadata = [],
        ) {
            // the shop's id, %d included: a UUID becomes its leading digits (0 when it starts with a letter)
            $this->messageId = hash('sha256', sprintf('%d|%s|%s|%s', $userId, $eventType->value,
                $searchPhrase ?? (string) $productId, $occurredAt->format('c')));
        }

        public function getWeight(): float
        {
            return $this->eventType->weight();
        }
    }
}

namespace {
    foreach (['Psr/Container', 'Psr/Log', 'Symfony/Contracts/Service', 'Symfony/Contracts/Deprecation',
              'Symfony/Component/String', 'Symfony/Component/PropertyAccess', 'Symfony/Component/PropertyInfo',
              'Symfony/Component/Serializer', 'Symfony/Contracts/EventDispatcher', 'Symfony/Component/EventDispatcher',
              'Symfony/Component/Messenger',
              'Symfony/Component/Messenger/Bridge/Amqp'] as $package) {
        if (is_file("/usr/share/php/$package/autoload.php")) {
            require_once "/usr/share/php/$package/autoload.php";
        }
    }

    use App\Application\Message\UpdateUserEmbeddingMessage;
    use App\Domain\EventType;
    use Psr\Container\ContainerInterface;
    use Symfony\Component\Messenger\Bridge\Amqp\Transport\AmqpTransportFactory;
    use Symfony\Component\Messenger\Envelope;
    use Symfony\Component\Messenger\Event\WorkerMessageFailedEvent;
    use Symfony\Component\Messenger\EventListener\AddErrorDetailsStampListener;
    use Symfony\Component\Messenger\EventListener\SendFailedMessageToFailureTransportListener;
    use Symfony\Component\Messenger\Stamp\BusNameStamp;
    use Symfony\Component\Messenger\MessageBus;
    use Symfony\Component\Messenger\Middleware\AddBusNameStampMiddleware;
    use Symfony\Component\Messenger\Middleware\SendMessageMiddleware;
    use Symfony\Component\Messenger\Transport\Sender\SendersLocator;
    use Symfony\Component\Messenger\Transport\Serialization\Serializer as MessengerSerializer;
    use Symfony\Component\Serializer\Encoder\JsonEncoder;
    use Symfony\Component\Serializer\Normalizer\ArrayDenormalizer;
    use Symfony\Component\Serializer\Normalizer\BackedEnumNormalizer;
    use Symfony\Component\Serializer\Normalizer\DateTimeNormalizer;
    use Symfony\Component\Serializer\Normalizer\ObjectNormalizer;
    use Symfony\Component\Serializer\Serializer;

    final class Senders implements ContainerInterface
    {
        public function __construct(private array $senders) {}
        public function get(string $id): mixed { return $this->senders[$id]; }
        public function has(string $id): bool { return isset($this->senders[$id]); }
    }

    [$_, $dsn, $optionsJson] = $argv + [null, null, '{}'];
    $options = json_decode($optionsJson, true, 512, JSON_THROW_ON_ERROR);

    // messenger.transport.symfony_serializer: the framework's serializer (enum and date normalizers included), JSON
    $serializer = new MessengerSerializer(new Serializer(
        [new BackedEnumNormalizer(), new DateTimeNormalizer(), new ArrayDenormalizer(), new ObjectNormalizer()],
        [new JsonEncoder()],
    ));
    $transport = (new AmqpTransportFactory())->createTransport($dsn, $options, $serializer);
    $failed = null;
    if (getenv('FAILED')) {  // the failure transport's DSN: the same broker and vhost, its own exchange and queue
        $failedOptions = json_decode(getenv('FAILED'), true, 512, JSON_THROW_ON_ERROR);
        $failed = [
            new AddErrorDetailsStampListener(),
            new SendFailedMessageToFailureTransportListener(new Senders(['user_embedding_updates' =>
                (new AmqpTransportFactory())->createTransport($dsn, $failedOptions, $serializer)])),
        ];
    }
    $bus = new MessageBus([
        new AddBusNameStampMiddleware('messenger.bus.default'),
        new SendMessageMiddleware(new SendersLocator(
            [UpdateUserEmbeddingMessage::class => ['user_embedding_updates']],
            new Senders(['user_embedding_updates' => $transport]),
        )),
    ]);

    while (($line = fgets(STDIN)) !== false) {
        if (trim($line) === '') {
            continue;
        }
        $e = json_decode($line, true, 512, JSON_THROW_ON_ERROR);
        if (!empty($e['sleepMs'])) {
            usleep((int) $e['sleepMs'] * 1000);
        }
        $message = new UpdateUserEmbeddingMessage(
            $e['userId'],
            EventType::from($e['eventType']),
            $e['searchPhrase'] ?? null,
            isset($e['productId']) ? (int) $e['productId'] : null,
            new \DateTimeImmutable($e['occurredAt']),
            $e['metadata'] ?? [],
        );
        for ($i = 0; $i < ($e['repeat'] ?? 1); $i++) {
            try {  // the shop's controllers catch and log a failed dispatch: the event is dropped
                if ($failed !== null) {  // the handler failed on the last retry: what the worker then does
                    $event = new WorkerMessageFailedEvent(new Envelope($message, [new BusNameStamp('messenger.bus.default')]),
                        'user_embedding_updates', new \RuntimeException('OpenAI API error: 503 Service Unavailable'));
                    foreach ($failed as $listener) {
                        $listener->onMessageFailed($event);
                    }
                } else {
                    $bus->dispatch($message);
                }
                echo "ok {$message->messageId}\n";
                if (getenv('RECORD')) {
                    file_put_contents(getenv('RECORD'), $serializer->encode(new Envelope($message))['body'] . "\n",
                        FILE_APPEND);
                }
            } catch (\Throwable $exc) {
                echo 'error ' . get_class($exc) . ': ' . str_replace("\n", ' ', $exc->getMessage()) . "\n";
            }
        }
    }
}
