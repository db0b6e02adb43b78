<?php
// The shop's MongoDB side, as its repository code does it (github.com/Nauflars/myshop, src/Infrastructure/Repository:
// MongoDBEmbeddingRepository::saveBatch, UserEmbeddingRepository::save/findByUserId/findSimilarProducts,
// RecommendationService's score filter), on the bare ext-mongodb driver (Debian's php-mongodb: the userland
// mongodb/mongodb library is not packaged) with an array typeMap in place of the library's BSONDocument/BSONArray.
// One difference, for the Mongo-wire test server: findOne's 64-bit `limit` is rejected there, so reads are
// queries without a limit (user_id is unique: the same document).
//
//   php shop_mongo.php URL DB write-products FILE.json   [{product_id, embedding, name, description, category,
//                                                         updated_at (optional, ISO 8601)}]
//   php shop_mongo.php URL DB write-profiles FILE.json   [{user_id, vector, last_updated (unix s), version}]
//   php shop_mongo.php URL DB read-profiles USER...      {user: {vector, last_updated, version} | {error}}
//   php shop_mongo.php URL DB rank N USER...             {user: [[product_id, score], ...] | {error}}
//   php shop_mongo.php URL DB ensure-indexes             the shop's idx_user_id and idx_last_updated
// Output: one JSON document on stdout. Exit 1 with a message on stderr when the driver or a document fails.

declare(strict_types=1);

const DIMENSIONS = 1536;               // UserEmbedding::DIMENSIONS
const RECOMMENDATION_LIMIT = 20;       // RecommendationService::RECOMMENDATION_LIMIT
const MIN_SIMILARITY_SCORE = 0.01;     // RecommendationService::MIN_SIMILARITY_SCORE
const TYPE_MAP = ['root' => 'array', 'document' => 'array', 'array' => 'array'];

[$url, $db, $command] = [$argv[1], $argv[2], $argv[3]];
$args = array_slice($argv, 4);
$manager = new MongoDB\Driver\Manager($url);

function find(MongoDB\Driver\Manager $m, string $ns, array $filter, array $options = []): array
{
    $cursor = $m->executeQuery($ns, new MongoDB\Driver\Query($filter, $options));
    $cursor->setTypeMap(TYPE_MAP);
    return $cursor->toArray();
}

// UserEmbeddingRepository::documentToEmbedding and the UserEmbedding constructor's checks
function readProfile(array $document): array
{
    $lastUpdated = $document['last_updated'];
    if ($lastUpdated instanceof MongoDB\BSON\UTCDateTime) {
        $lastUpdatedAt = DateTimeImmutable::createFromMutable($lastUpdated->toDateTime());
    } else {
        $lastUpdatedAt = new DateTimeImmutable($lastUpdated);
    }
    $vector = $document['vector'];
    $userId = (string) $document['user_id'];
    $version = (int) $document['version'];
    if ('' === $userId) {
        throw new InvalidArgumentException('User ID cannot be empty');
    }
    if (DIMENSIONS !== count($vector)) {  // a non-array is a TypeError here, as in the shop
        throw new InvalidArgumentException(sprintf('Embedding must be %d dimensions, got %d', DIMENSIONS, count($vector)));
    }
    if ($version < 1) {
        throw new InvalidArgumentException('Version must be at least 1');
    }
    foreach ($vector as $x) {
        if (!is_float($x)) {
            throw new InvalidArgumentException('vector holds a ' . get_debug_type($x) . ', not doubles');
        }
    }
    return ['vector' => $vector, 'last_updated' => $lastUpdatedAt->format(DATE_ATOM), 'version' => $version];
}

// UserEmbeddingRepository::calculateCosineSimilarity
function cosine(array $vec1, array $vec2): float
{
    if (count($vec1) !== count($vec2)) {
        return 0.0;
    }
    $dot = 0;
    $m1 = 0;
    $m2 = 0;
    for ($i = 0; $i < count($vec1); ++$i) {
        $dot += $vec1[$i] * $vec2[$i];
        $m1 += $vec1[$i] * $vec1[$i];
        $m2 += $vec2[$i] * $vec2[$i];
    }
    $m1 = sqrt($m1);
    $m2 = sqrt($m2);
    return (0 == $m1 || 0 == $m2) ? 0.0 : $dot / ($m1 * $m2);
}

function withErrors(array $users, callable $each): array
{
    $out = [];
    foreach ($users as $user) {
        try {
            $out[$user] = $each($user);
        } catch (Throwable $e) {
            $out[$user] = ['error' => get_class($e) . ': ' . $e->getMessage()];
        }
    }
    return $out;
}

function profileOf(MongoDB\Driver\Manager $m, string $db, string $user): array
{
    $docs = find($m, "$db.user_embeddings", ['user_id' => $user]);
    if (!$docs) {
        throw new RuntimeException("no profile for $user");
    }
    return readProfile($docs[0]);
}

switch ($command) {
    case 'write-products':  // MongoDBEmbeddingRepository::saveBatch with ProductEmbedding::toArray
        $bulk = new MongoDB\Driver\BulkWrite();
        foreach (json_decode(file_get_contents($args[0]), true, 512, JSON_THROW_ON_ERROR) as $p) {
            $bulk->update(['productId' => $p['product_id']], ['$set' => [
                'product_id' => $p['product_id'],
                'embedding' => array_map('floatval', $p['embedding']),
                'name' => $p['name'],
                'description' => $p['description'],
                'category' => $p['category'],
                'metadata' => ['brand' => 'shop'],
                // ProductEmbedding::$updatedAt (set to now by every setter), written as an ATOM string
                'updated_at' => (new DateTimeImmutable($p['updated_at'] ?? '2026-02-10T14:30:00+00:00'))
                    ->format(DateTime::ATOM),
            ]], ['upsert' => true]);
        }
        $result = $manager->executeBulkWrite("$db.product_embeddings", $bulk);
        echo json_encode(['saved' => $result->getUpsertedCount() + $result->getModifiedCount()]), "\n";
        break;

    case 'write-profiles':  // UserEmbeddingRepository::save with embeddingToDocument
        $written = 0;
        foreach (json_decode(file_get_contents($args[0]), true, 512, JSON_THROW_ON_ERROR) as $p) {
            $now = new MongoDB\BSON\UTCDateTime();
            $document = [
                'user_id' => $p['user_id'],
                'vector' => array_map('floatval', $p['vector']),
                'dimension_count' => count($p['vector']),
                'last_updated' => new MongoDB\BSON\UTCDateTime($p['last_updated'] * 1000),
                'version' => $p['version'],
                'updated_at' => $now,
            ];
            $bulk = new MongoDB\Driver\BulkWrite();
            if (1 === $p['version']) {
                $document['created_at'] = $now;
                $bulk->insert($document);
            } else {
                $bulk->update(['user_id' => $p['user_id'], 'version' => $p['version'] - 1], ['$set' => $document]);
            }
            $result = $manager->executeBulkWrite("$db.user_embeddings", $bulk);
            $written += $result->getInsertedCount() + $result->getModifiedCount();
        }
        echo json_encode(['written' => $written]), "\n";
        break;

    case 'read-profiles':
        echo json_encode(withErrors($args, fn ($u) => profileOf($manager, $db, $u))), "\n";
        break;

    case 'rank':  // RecommendationService::generateRecommendations -> findSimilarProducts -> filterByMinScore
        $n = (int) array_shift($args);
        $products = find($manager, "$db.product_embeddings", [], ['projection' => ['product_id' => 1, 'embedding' => 1, '_id' => 0]]);
        echo json_encode(withErrors($args, function ($user) use ($manager, $db, $products, $n) {
            $vector = profileOf($manager, $db, $user)['vector'];
            $results = [];
            foreach ($products as $doc) {
                if (!isset($doc['embedding']) || !is_array($doc['embedding'])) {
                    continue;
                }
                $results[] = [$doc['product_id'], cosine($vector, $doc['embedding'])];
            }
            usort($results, fn ($a, $b) => $b[1] <=> $a[1]);
            $results = array_slice($results, 0, RECOMMENDATION_LIMIT);
            $results = array_values(array_filter($results, fn ($r) => $r[1] >= MIN_SIMILARITY_SCORE));
            return array_slice($results, 0, $n);
        })), "\n";
        break;

    case 'ensure-indexes':  // UserEmbeddingRepository::ensureIndexes
        $manager->executeCommand($db, new MongoDB\Driver\Command(['createIndexes' => 'user_embeddings', 'indexes' => [
            ['key' => ['user_id' => 1], 'name' => 'idx_user_id', 'unique' => true],
            ['key' => ['last_updated' => 1], 'name' => 'idx_last_updated'],
        ]]));
        echo json_encode(['indexes' => ['idx_user_id', 'idx_last_updated']]), "\n";
        break;

    default:
        fwrite(STDERR, "unknown command $command\n");
        exit(2);
}
