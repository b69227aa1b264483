package org.dijiang.demo.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test

/**
 * The chat format comes from the export (chat_format.json), not from the app: fed turn by
 * turn through [ChatSession], each template's pieces add up to what transformers renders for
 * the whole conversation ([ChatFormatFixtures], written from the real templates).
 */
class ChatFormatTest {
    private fun conversation(): List<Pair<String, String>> =
        Json.parse(ChatFormatFixtures.CONVERSATION_JSON).asList()!!.map { turn ->
            val pair = turn.asList()!!
            (pair[0] as String) to (pair[1] as String)
        }

    /** Replies scripted as single pieces ending in [eos]; the last turn's reply is only the EOS. */
    private fun runnerFor(fx: ChatFixture): FakeRunner {
        val replies = conversation().filter { it.first == "assistant" }.map { listOf(it.second, fx.eos) }
        return FakeRunner(replies + listOf(listOf(fx.eos)), eos = fx.eos)
    }

    @Test
    fun everyTemplateFedTurnByTurnEqualsItsRenderingOfTheWholeConversation() {
        for ((name, fx) in ChatFormatFixtures.ALL) {
            val runner = runnerFor(fx)
            val session = ChatSession(runner, setOf(fx.eos), 1L shl 20, fx.format)
            for ((role, text) in conversation()) {
                if (role == "user") session.send(text, 64, 0f) { _, _ -> }
            }
            assertEquals(name, fx.rendered, runner.fed.toString())
            assertEquals(name, 0, runner.resets)
        }
    }

    @Test
    fun theFormatIsTheExportsNotSmolLm2s() {
        val headers = ChatFormatFixtures.HEADERS.format
        val first = ChatSession(FakeRunner(listOf(listOf("<|eot_id|>")), eos = "<|eot_id|>"),
            setOf("<|eot_id|>"), 1L shl 20, headers).textFor("Hi")
        assertEquals("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi" +
            "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", first)
        assertTrue(!first.contains("<|im_start|>") && !first.contains("SmolLM"))
    }

    @Test
    fun aReplyCutByTheLimitFeedsItsLastPieceBeforeTheNextTurn() {
        val fx = ChatFormatFixtures.INST
        val runner = FakeRunner(listOf(listOf("a", "b", "c", fx.eos), listOf(fx.eos)), eos = fx.eos)
        val s = ChatSession(runner, setOf(fx.eos), 1L shl 20, fx.format)
        assertEquals(EndReason.MAX_TOKENS, s.send("one", 2, 0f) { _, _ -> }.endReason)
        assertEquals("b</s>[INST] two [/INST]", s.send("two", 2, 0f) { _, _ -> }.fedText)
        assertEquals("<s>[INST] one [/INST]ab</s>[INST] two [/INST]", runner.fed.toString())
    }

    @Test
    fun readsTheExportersFile() {
        val f = ChatFormat.fromJson(
            """{"version": 1, "first": "A", "user_suffix": "B", "between": "C", "source": "chat_template"}""")
        assertEquals(ChatFormat("A", "B", "C", "chat_template"), f)
        assertEquals("AxB", f.firstTurn("x"))
        assertEquals("CyB", f.nextTurn("y"))
    }

    @Test
    fun refusesAFileItCannotUse() {
        val bad = mapOf(
            "[]" to "not a JSON object",
            """{"version": 2, "first": "", "user_suffix": "", "between": "x"}""" to "version 2",
            """{"version": 1, "first": "", "between": "x"}""" to "\"user_suffix\"",
            """{"version": 1, "first": "", "user_suffix": "", "between": ""}""" to "empty \"between\"")
        for ((text, why) in bad) {
            try {
                ChatFormat.fromJson(text)
                fail("accepted $text")
            } catch (e: IllegalArgumentException) {
                assertTrue("${e.message} should say $why", e.message!!.contains(why))
            }
        }
    }
}
